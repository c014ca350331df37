"""The training step: the models it trains (the VAE, its EMA copy, the DDP / compiled
wrapper), AdamW, the precision context, and one step: forward, backward, clip, the skip
decision (taken on the device, the same on every rank), the masked update and the EMA,
eagerly (EagerStep) or replayed from a CUDA graph (GraphedStep, --cuda_graphs).
train_loop.py calls it every step; bench.py times exactly this step.

    model, ema = build_models(H, dist_info)
    optimizer = make_optimizer(H, model, dist_info.device)
    step = make_step(H, wrap_for_training(H, model, dist_info), model, ema, optimizer, scaler,
                     precision_context(H, dist_info.device))
    stats, stop = step(x_uint8_on_the_device, learning_rate(H, it))   # device tensors: no wait
"""
import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from hps import UserError
from utils import allreduce
from vae import VAE


# ----------------------------------------------------------------------------- set-up: models, optimizer, precision

def precision_context(H, device):
    """One autocast context for the whole training forward (nanoGPT's ``ctx``); without the
    cast cache under --cuda_graphs (a captured step must recompute its casts)."""
    if H.precision == 'fp32':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if H.precision == 'bf16' else torch.float16
    if device.type == 'cpu' and H.precision == 'fp16':
        raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return torch.autocast(device.type, dtype=dtype, cache_enabled=not H.cuda_graphs)


def build_models(H, dist_info):
    """Training model (DDP-wrapped when distributed) and its EMA copy, both on dist_info.device."""
    torch.manual_seed(H.seed)  # identical initialisation on every rank
    model = VAE(H)
    ema = VAE(H)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    model.to(dist_info.device)
    ema.to(dist_info.device)
    if H.channels_last:
        model.set_channels_last(True)
        ema.set_channels_last(True)
    if H.grad_checkpoint:
        model.set_grad_checkpoint(True)
    if H.rank_invariant_noise:
        model.set_noise_slice(dist_info.rank, dist_info.world_size)
    # posterior noise: offset by rank unless every rank draws the global batch's noise
    torch.manual_seed(H.seed if H.rank_invariant_noise else H.seed + dist_info.rank)
    return model, ema


def wrap_for_training(H, model, dist_info):
    """The module the training step calls: DDP when distributed, and with --compile either
    torch.compile of the whole (DDP-wrapped) model or, --compile_scope blocks, of each
    residual block and the DMoL loss inside ``model`` (VAE.compile_blocks).  The EMA model
    is never compiled: evaluation and sampling run eagerly."""
    kw = dict(mode=H.compile_mode) if H.compile_mode else {}
    if H.compile and H.compile_scope == 'blocks':
        model.compile_blocks(**kw)
    net = model
    if dist_info.world_size > 1:
        # the GPU this process computes on (utils.cuda_device): cuda:0 when a launcher gives each
        # process its own GPU, whatever its local rank
        net = DistributedDataParallel(model, device_ids=[dist_info.device] if dist_info.device.type == 'cuda' else None)
    if H.compile and H.compile_scope == 'model':
        net = torch.compile(net, **kw)
    return net


def make_optimizer(H, model, device):
    """AdamW as the release (eps 1e-8).  The fused implementation (one kernel for all
    parameters) on CUDA and CPU; it matches the per-parameter loop to float rounding.
    With --cuda_graphs: capturable (step counts on the device) and the learning rate a
    device tensor, which the captured step reads (GraphedStep)."""
    kw = dict(fused=True) if device.type in ('cuda', 'cpu') else {}
    lr = H.lr
    if H.cuda_graphs:
        kw['capturable'], lr = True, torch.tensor(H.lr, dtype=torch.float32, device=device)
    return torch.optim.AdamW(model.parameters(), weight_decay=H.wd, lr=lr, betas=(H.adam_beta1, H.adam_beta2),
                             eps=1e-8, **kw)


def check_cuda_graphs(H, dist_info):
    """--cuda_graphs needs one CUDA device and a step without host decisions."""
    if not H.cuda_graphs:
        return
    if dist_info.device.type != 'cuda':
        raise UserError("--cuda_graphs needs a CUDA GPU (it captures the step in a CUDA graph); drop it on the CPU")
    if dist_info.world_size > 1:
        raise UserError("--cuda_graphs runs in one process for now; drop it under torchrun/mpiexec")
    if H.precision == 'fp16' or H.compile:
        raise UserError("--cuda_graphs works with --precision fp32 or bf16 and without --compile "
                        f"(got --precision {H.precision}{' --compile' if H.compile else ''})")


def learning_rate(H, it):
    """Linear warm-up multiplier min(1, it / warmup_iters); no warm-up when warmup_iters is 0."""
    return H.lr * (min(1.0, it / H.warmup_iters) if H.warmup_iters > 0 else 1.0)


# per-step statistics, in the order the host reads them (train_loop.StepStats)
# ----------------------------------------------------------------------------- one step

STEP_STATS = ('elbo', 'distortion', 'rate', 'distortion_nans', 'rate_nans', 'grad_norm', 'skipped_updates',
              'overflow_steps')


COUNTS = ('distortion_nans', 'rate_nans', 'skipped_updates', 'overflow_steps')


def training_step(H, x_in, x_target, net, model, ema, optimizer, scaler, ctx, lr, stop_flag=False):
    """Forward, backward, clip, and (unless skipped) update + EMA, queued on the device without
    the host waiting for any of it: the skip decision is taken on the device (step_outcome)
    from statistics all-reduced over ranks, so every rank takes the same one.

    Returns (stats, stop): stats = {name in STEP_STATS: 0-dim float tensor on the
    parameters' device}, averaged over ranks (the counts are 0 or 1); stop = the ranks'
    mean of ``stop_flag`` (> 0 when any rank was asked to stop)."""
    for g in optimizer.param_groups:
        g['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    with ctx:
        out = net(x_in, x_target)
    (scaler.scale(out['elbo']) if scaler else out['elbo']).backward()
    found_inf = None
    if scaler:
        scaler.unscale_(optimizer)
        found_inf = sum(scaler._found_inf_per_device(optimizer).values())  # what scaler.step would act on
    grad_norm = clip_gradients(H, model)
    distortion, rate = out['distortion'].detach().float(), out['rate'].detach().float()
    # everything the ranks must agree on, in one all-reduce
    row = mean_over_ranks(torch.stack([
        out['elbo'].detach().float(), distortion, rate, torch.isnan(distortion).float(), torch.isnan(rate).float(),
        grad_norm.float(), torch.zeros_like(grad_norm) if found_inf is None else found_inf.float().reshape(()),
        torch.full((), float(stop_flag), device=grad_norm.device)]))
    elbo, distortion, rate, distortion_nans, rate_nans, grad_norm, found_inf, stop = row.unbind()
    update, skipped, overflow = step_outcome(H.skip_threshold, distortion_nans + rate_nans, grad_norm,
                                             found_inf if scaler else None)
    masked_update(optimizer, model, ema, H.ema_rate, update)
    if scaler:
        scaler.update()  # lowers the loss scale after an overflow
    stats = dict(elbo=elbo, distortion=distortion, rate=rate, distortion_nans=(distortion_nans > 0).float(),
                 rate_nans=(rate_nans > 0).float(), grad_norm=grad_norm, skipped_updates=skipped,
                 overflow_steps=overflow)
    return stats, stop


def clip_gradients(H, model):
    """Clip the total gradient norm to --grad_clip (the one place gradients are clipped; -1:
    no clipping); returns the pre-clip norm, measured either way (0-dim, on the parameters'
    device, no host synchronisation)."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if H.grad_clip == -1 else H.grad_clip)


def mean_over_ranks(t):
    """Average of t over ranks (all-reduce on t's device, no host synchronisation)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return allreduce(t) / world if world > 1 else t


def step_outcome(skip_threshold, nans, grad_norm, found_inf=None):
    """(update, skipped, overflow): 0/1 float tensors on the device, exactly one of them 1.

    The release's rule: skip the update when any rank saw NaN in distortion or rate
    (``nans`` > 0, ranks' mean), when the grad norm is not finite, or when it reaches
    ``skip_threshold`` (-1: never).  With fp16 loss scaling, ``found_inf`` > 0 says the
    GradScaler found inf/NaN gradients; with finite losses that is an overflow, counted
    apart from skipped updates (the scaler lowers its scale and the next step goes on)."""
    bad = (nans > 0) | ~torch.isfinite(grad_norm)
    if skip_threshold != -1:
        bad = bad | (grad_norm >= skip_threshold)
    overflow = (found_inf > 0) & (nans == 0) if found_inf is not None else torch.zeros_like(bad)
    skipped = bad & ~overflow
    return (~bad & ~overflow).float(), skipped.float(), overflow.float()


def masked_update(optimizer, model, ema, rate, update):
    """optimizer.step() and the EMA update where ``update`` (0-dim 0/1 float on the device) is 1;
    where it is 0, parameters, optimizer state (step count included) and EMA stay exactly as
    they are.  A fused optimizer takes the decision on the device, through the ``found_inf``
    hook its kernels share with GradScaler (skip where found_inf == 1); other optimizers
    need the host to read it (one synchronisation)."""
    if all(g.get('fused') for g in optimizer.param_groups):
        optimizer.found_inf = 1 - update
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        update_ema(model, ema, rate, update)
    elif update.item():
        optimizer.step()
        update_ema(model, ema, rate)


@torch.no_grad()
def update_ema(model, ema, rate, update=None):
    """ema = ema * rate + param * (1 - rate), with 1 - rate in float32 as the release:
    bitwise the release's numbers.  ``update``: an optional 0/1 float tensor on the device;
    where 0, the EMA stays as it is (ema * 1 + param * 0), without the host reading it.

    param * (1 - rate) is formed in the gradient buffers, which the optimizer no longer
    needs, so the update allocates nothing (parameters without a gradient get a temporary)."""
    keep, take = float(np.float32(rate)), float(np.float32(1) - np.float32(rate))
    if update is not None:
        keep, take = update * keep + (1 - update), update * take  # (rate, 1 - rate) or (1, 0), exactly
    ema_params, params = list(ema.parameters()), list(model.parameters())
    scratch = [p.grad for p in params]
    if any(g is None or g.dtype != p.dtype for g, p in zip(scratch, params)):
        scratch = torch._foreach_mul(params, take)
    else:
        torch._foreach_copy_(scratch, params)
        torch._foreach_mul_(scratch, take)
    torch._foreach_mul_(ema_params, keep)
    torch._foreach_add_(ema_params, scratch)


# ----------------------------------------------------------------------------- the step the loop calls: eager, or replayed from a CUDA graph

class EagerStep:
    """One training step from a uint8 batch on the device: preprocess, then training_step."""

    warmup_calls = 1  # calls before every call costs what the next one does (the first makes the optimizer state)

    def __init__(self, H, net, model, ema, optimizer, scaler, ctx):
        self.H, self.net, self.model, self.ema, self.optimizer, self.scaler, self.ctx = \
            H, net, model, ema, optimizer, scaler, ctx

    def __call__(self, x, lr, stop_flag=False):
        x_in, x_target = data.preprocess(self.H, x)
        return training_step(self.H, x_in, x_target, self.net, self.model, self.ema, self.optimizer, self.scaler,
                             self.ctx, lr, stop_flag)


class GraphedStep(EagerStep):
    """The whole training step in one CUDA graph (--cuda_graphs), replayed every step.

    The graph reads a static uint8 batch buffer and the learning rate from a device tensor
    (the optimizer's, see make_optimizer; checkpoints.load_optimizer_file keeps that tensor), and
    writes its statistics to static tensors that each call copies out.  The first ``warmup``
    steps run eagerly on a side stream (lazy initialisation: optimizer state, cuDNN/cuBLAS
    handles), the next one captures the graph, and every step after replays it.  Everything
    the step decides (skip, clip) is decided on the device already, so a replay is the eager
    step's arithmetic; the posterior noise comes from the same generator, through the
    graph's own offsets (fresh noise on every replay).

    The capture runs in CUDA's thread-local mode.  In the default (global) mode a CUDA call
    from any other thread during the capture invalidates it, and the DataLoader's pin-memory
    thread makes such calls while it pins the next batch (cudaHostAlloc, event queries); the
    error then also kills that thread.  Other threads' work is never part of the graph; this
    step's batch is in the static buffer before the capture begins (torch.cuda.graph first
    synchronises the device)."""

    def __init__(self, H, net, model, ema, optimizer, scaler, ctx, warmup=3):
        super().__init__(H, net, model, ema, optimizer, scaler, ctx)
        self.lr = optimizer.param_groups[0]['lr']
        self.warmup, self.calls, self.replays, self.graph = warmup, 0, 0, None
        self.warmup_calls = warmup + 2  # until every call is a plain replay: eager steps, capture (+ replay), a replay
        self.x = self.stats = None

    @property
    def captures_next(self):
        """Whether the next call captures the graph (takes a while: the progress bar says so)."""
        return self.graph is None and self.calls >= self.warmup

    def _step(self):
        stats, _ = super().__call__(self.x, self.lr)
        return stats

    def __call__(self, x, lr, stop_flag=False):
        if self.x is None:
            self.x = torch.empty_like(x)
        if x.shape != self.x.shape:
            raise UserError(f"--cuda_graphs replays one batch shape, {tuple(self.x.shape)}; got {tuple(x.shape)}")
        self.x.copy_(x, non_blocking=True)
        self.lr.fill_(lr)
        if self.calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                stats = self._step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, capture_error_mode='thread_local'):
                    self.stats = self._step()
            self.graph.replay()
            self.replays += 1
            stats = self.stats
        self.calls += 1
        stats = {k: v.clone() for k, v in stats.items()}  # the static outputs are overwritten by the next replay
        return stats, torch.zeros_like(stats['elbo'])  # one process: the loop reads the stop flag itself


def make_step(H, net, model, ema, optimizer, scaler, ctx):
    """The training loop's step: a GraphedStep with --cuda_graphs, else an EagerStep."""
    cls = GraphedStep if H.cuda_graphs else EagerStep
    return cls(H, net, model, ema, optimizer, scaler, ctx)
