"""A run's checkpoints: reading them safely, checking that a file fits the model, writing a
set, finding the newest complete set, resuming from it (or from the release's four restore
flags), and the run folder's bookkeeping.

A checkpoint set {run_dir}/{name}-* holds the release's four files (-model.th,
-model-ema.th, -opt.th, -log.jsonl) plus -state.th, written last, with where the run stands
(Progress: the step, epoch, position in the epoch, best validation ELBO, skipped updates,
a fingerprint of the training data), every rank's RNG state, the configuration and the
size and CRC of the other four.  Before a new `latest` set is written the complete current
one becomes `previous`, so a crash at any point of a save leaves one complete set behind.
Every file is read with torch.load(weights_only=True) (safe_torch_load), and a file that does
not fit the model is one line saying why (describe_mismatch).  train.py and train_loop.py
call these; sample.py and evaluate.py use resolve_weights to read a run, released.py the
loaders and describe_mismatch.
"""
import json
import os
import pickle
import shutil
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

import data
from hps import HPARAMS_REGISTRY, NOT_RUN_KEYS, SIZED_PRESETS, UserError, apply_run_config, preset
from tensorboard_log import FOLDER as EVENT_FOLDER
from utils import (atomic_write, barrier, first_sentence, gather_objects, read_log, remove_stale_temporaries,
                   write_text)
from vae import VAE, parse_layer_string
from vae_helpers import dmol_params_per_mixture

# The release's four files of a checkpoint set; its -state.th records the size and CRC of each.
CHECKPOINT_FILES = ['-model.th', '-model-ema.th', '-opt.th', '-log.jsonl']
# The hyperparameters that decide the shapes of a model's state dict.
SHAPE_KEYS = ('image_size', 'image_channels', 'width', 'zdim', 'custom_width_str', 'bottleneck_multiple',
              'no_bias_above', 'num_mixtures', 'enc_blocks', 'dec_blocks')
ENC_BLOCKS, DEC_BLOCKS = 'encoder.enc_blocks.', 'decoder.dec_blocks.'  # state-dict key prefixes of the blocks
CONV_IN, CONV_OUT = 'encoder.in_conv.weight', 'decoder.out_net.out_conv.weight'


# ----------------------------------------------------------------------------- reading files

def safe_torch_load(path, what='checkpoint'):
    """torch.load with weights_only=True onto the CPU; no code inside the file can run.
    Anything unreadable is a one-line UserError naming the file and what is wrong with it
    (why_unreadable)."""
    if not path or not os.path.exists(path):
        raise UserError(f"{what} file {path!r} does not exist")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if 'GLOBAL' in line]
        if found:  # a pickled Python object: unpickling it could run code
            name = found[0].split('GLOBAL', 1)[1].split()[0]
            raise UserError(f"refusing to load {path}: besides tensors it holds a Python object ({name}), "
                            f"which could run code when unpickled; use a plain {what} (torch.save of a "
                            "state_dict(), as this repository and the release write), or re-save this one's "
                            "state_dict() where you trust its source") from None
        raise UserError(f"cannot read {what} {path}: {why_unreadable(path, e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # torch.load raises RuntimeError, KeyError, IndexError, EOFError, ... on non-files
        raise UserError(f"cannot read {what} {path}: {why_unreadable(path, e)}") from None


def load_state_dict_file(path):
    """A plain {name: tensor} state dict from ``path``, ``module.`` prefixes stripped."""
    sd = safe_torch_load(path, 'state dict')
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"{path} is not a model state dict (expected a dict of parameter name -> tensor, "
                        f"got {type(sd).__name__}); pass a -model.th or -model-ema.th file")
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in sd.items()}


def _zip_intact(path):
    """True: a complete zip (torch.save's format) whose every member matches the CRC stored
    with it; False: a zip that is cut off or whose bytes changed; None: not a zip at all."""
    with open(path, 'rb') as f:
        is_zip = f.read(4) == b'PK\x03\x04'
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error):
        return False if is_zip else None


def why_unreadable(path, error):
    """Why torch.load failed on ``path``, in words: empty, truncated (a zip cut off before
    its directory), a checksum failure (a member's bytes differ from the CRC the zip stores
    with them), pickled data that cannot be unpickled, or not a PyTorch file at all."""
    size = os.path.getsize(path)
    if size == 0:
        return 'it is empty (0 bytes)'
    intact = _zip_intact(path)
    if intact is None:
        with open(path, 'rb') as f:
            legacy = f.read(1) == b'\x80'  # a pickle: torch.save's format before the zip one
        if not legacy:
            return 'it is not a PyTorch file (neither the zip format of torch.save nor its older pickle format)'
        return f'its pickled data cannot be unpickled, so it is truncated or corrupt ({type(error).__name__}' + \
            (f': {first_sentence(error)})' if first_sentence(error) else ')')
    if not intact:
        if not zipfile.is_zipfile(path):
            return (f'it is truncated: {size:,} bytes of a PyTorch (zip) file whose end, the zip directory, is '
                    'missing (a write or copy that did not finish)')
        return ('it fails its checksum: bytes inside it differ from the CRC stored with them (changed in place: '
                'disk, memory or copy corruption)')
    detail = first_sentence(error)
    return f'its pickled data cannot be unpickled ({type(error).__name__}{": " + detail if detail else ""})'


def file_crc(path):
    crc = 0
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            crc = zlib.crc32(chunk, crc)
    return os.path.getsize(path), crc


def file_damage(path, recorded):
    """What is wrong with ``path`` against the (size, CRC) ``recorded`` when it was saved, in
    words; None when it matches."""
    if not os.path.exists(path):
        return 'missing'
    (size, crc), (rsize, rcrc) = file_crc(path), tuple(recorded)
    if (size, crc) == (rsize, rcrc):
        return None
    if _zip_intact(path):  # a whole, self-consistent file, just not the one recorded
        return (f'another file than the one recorded ({size:,} bytes, recorded {rsize:,}; e.g. from a later save '
                'that did not finish)')
    if size < rsize:
        return f'truncated ({size:,} of {rsize:,} bytes)'
    if size == rsize:
        return (f'checksum failure (same size, CRC {crc:08x} instead of {rcrc:08x}: bytes changed in place, e.g. '
                'by disk or copy corruption)')
    return f'changed since it was saved ({size:,} bytes, recorded {rsize:,})'


# ----------------------------------------------------------------------------- does a file fit the model

def describe_mismatch(model, sd, path, H):
    """One line saying how ``sd`` differs from ``model``: the most likely cause and its fix
    first, then the details after ';'."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f'{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}' for k in want
             if k in sd and sd[k].shape != want[k].shape]
    parts = [f"{path} does not fit the model built from --hps {H.hparam_sets}"]
    guess = guess_preset(sd)
    cause = _likely_cause(sd, want, H)
    if guess:
        parts[0] += f": it looks like a checkpoint of the {guess!r} preset, run with --hps {guess}"
        if cause:
            parts.append(cause[0])
    elif cause:
        parts[0] += f": {cause[0]}; {cause[1]}"
    parts.append(f"{len(sd)} tensors in the file, {len(want)} in the model")
    if missing:
        parts.append(f"missing from the file ({len(missing)}): {_abbrev(missing)}")
    if unexpected:
        parts.append(f"not in the model ({len(unexpected)}): {_abbrev(unexpected)}")
    if wrong:
        parts.append(f"Shape differs ({len(wrong)}): {_abbrev(wrong)}")
    return '; '.join(parts)


def guess_preset(sd):
    """Name of the registry preset whose model has exactly the keys and shapes of ``sd``, or
    None.  Cheap, as an error path should be: a preset's model is built (model_shapes, on the
    meta device, once per architecture) only when its outline, read off its flags, is the
    file's: the numbers of encoder and decoder blocks and the input and output convolutions."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    outline = (block_count(shapes, ENC_BLOCKS), block_count(shapes, DEC_BLOCKS), shapes.get(CONV_IN),
               shapes.get(CONV_OUT))
    for name in HPARAMS_REGISTRY:
        if name in SIZED_PRESETS:  # an architecture fitted to a dataset's size: no one file's to compare with
            continue
        H = preset(name)
        if _outline(H) == outline and model_shapes(H) == shapes:
            return name
    return None


def _outline(H):
    """guess_preset's outline of VAE(H), without building it."""
    return (len(parse_layer_string(H.enc_blocks)), len(parse_layer_string(H.dec_blocks)),
            (H.width, H.image_channels, 3, 3),
            (H.num_mixtures * dmol_params_per_mixture(H.image_channels), H.width, 1, 1))


_SHAPES = {}  # model_shapes' cache: SHAPE_KEYS values -> {name: shape}


def model_shapes(H):
    """{name: shape} of VAE(H)'s state dict, built on the meta device (no memory, no
    initialisation) once per architecture (SHAPE_KEYS)."""
    key = tuple(H[k] for k in SHAPE_KEYS)
    if key not in _SHAPES:
        with torch.device('meta'):
            _SHAPES[key] = {k: tuple(v.shape) for k, v in VAE(H).state_dict().items()}
    return dict(_SHAPES[key])


def _likely_cause(sd, want, H):
    """(what differs, the fix) for the first architecture setting that explains a mismatch."""
    def shape(state_dict, k):
        return tuple(state_dict[k].shape) if k in state_dict else None
    conv_in, conv_out = CONV_IN, CONV_OUT
    f_in, m_in, f_out = shape(sd, conv_in), shape(want, conv_in), shape(sd, conv_out)
    if f_in and m_in and f_in[1] != m_in[1]:
        return (f"the file is for {f_in[1]}-channel images and the model for {m_in[1]}-channel ones ({H.dataset}: "
                f"{conv_in} {f_in} vs {m_in})",
                "use a preset of the checkpoint's dataset (--hps, e.g. cifar10 or imagenet32 for RGB, "
                "fashion_mnist for grayscale) or the checkpoint of a run on this dataset")
    if f_in and m_in and f_in[0] != m_in[0]:
        return f"the file has width {f_in[0]}, the model {m_in[0]}", f"pass --width {f_in[0]}"
    m_out = shape(want, conv_out)
    if f_out and m_out and f_out != m_out:
        k = f_out[0] // dmol_params_per_mixture(H.image_channels)
        return f"the output head differs ({conv_out} {f_out} vs {m_out})", f"pass --num_mixtures {k}"
    for kind, prefix, flag in [('encoder', ENC_BLOCKS, '--enc_blocks'), ('decoder', DEC_BLOCKS, '--dec_blocks')]:
        n_file, n_model = block_count(sd, prefix), block_count(want, prefix)
        if n_file != n_model:
            return (f"The file has {n_file} {kind} blocks, {flag} {H[flag[2:]]!r} builds {n_model}",
                    f"pass {flag} with a layer string of {n_file} blocks that matches the file")
    return None


def block_count(keys, prefix):
    """Blocks in a state dict's ``keys`` whose names start with ``prefix`` (ENC_BLOCKS, DEC_BLOCKS)."""
    idx = {int(k[len(prefix):].split('.')[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _abbrev(items, n=3):
    return ', '.join(items[:n]) + (' ...' if len(items) > n else '')


def check_finite(sd, path):
    """Refuse a state dict with NaN or infinite values (a damaged file or a diverged run)."""
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path} holds values that are not finite (NaN or inf) in {len(bad)} of {len(sd)} tensors "
                        f"({_abbrev(bad)}): the file is damaged, or was saved from a diverged run; use another "
                        "checkpoint")


# ----------------------------------------------------------------------------- the record of a set

def _sibling_state(path):
    """(suffix, path of the -state.th beside it) for a file of a checkpoint set whose
    -state.th exists; (None, None) otherwise."""
    suffix = next((s for s in CHECKPOINT_FILES if path.endswith(s)), None)
    state_path = path[:-len(suffix)] + '-state.th' if suffix else None
    return (suffix, state_path) if state_path and os.path.isfile(state_path) else (None, None)


def check_recorded_checksum(path):
    """If ``path`` is a file of a checkpoint set whose -state.th is beside it, refuse it
    when its size or CRC differ from those recorded at save time.  Returns whether a
    record was found and matched."""
    suffix, state_path = _sibling_state(path)
    if state_path is None:
        return False
    try:
        recorded = tuple(safe_torch_load(state_path, 'training state')['files'][suffix])
    except (UserError, KeyError, TypeError, IndexError):
        return False  # no usable record: the caller's other checks still apply
    damage = file_damage(path, recorded)
    if damage:
        raise UserError(f"{path} is damaged: {damage}, against the size and CRC that {state_path} recorded "
                        "when it was saved; use another checkpoint of the run (e.g. previous-* or an iter-N-* set)")
    return True


def saved_state(path):
    """The record of the -state.th beside a checkpoint file (None where there is none, or it
    is unreadable)."""
    _, state_path = _sibling_state(path)
    if state_path is None:
        return None
    try:
        state = safe_torch_load(state_path, 'training state')
    except UserError:
        return None
    return state if isinstance(state, dict) else None


def saved_run_config(path):
    """The 'H' of the -state.th beside a checkpoint file (None where there is none)."""
    state = saved_state(path)
    return state.get('H') if state is not None else None


# ----------------------------------------------------------------------------- loading weights, optimizer state and logs

def restore_params(model, path, H, verified=False):
    """Load a -model.th / -model-ema.th file into ``model`` (any device), strictly.  The
    file must match the size and CRC its set's -state.th recorded (where there is one;
    ``verified``: the caller has checked that already, e.g. find_checkpoint) and
    hold only finite values."""
    if not verified:
        check_recorded_checksum(path)
    sd = load_state_dict_file(path)
    want = model.state_dict()
    if set(sd) != set(want) or any(sd[k].shape != want[k].shape for k in want):
        raise UserError(describe_mismatch(model, sd, path, H))
    check_finite(sd, path)
    model.load_state_dict(sd)


def convert_apex_optimizer_state(sd):
    """Turn an apex FusedAdam state dict (step per group, no per-parameter step) into
    torch.optim.AdamW's layout (a float32 0-dim ``step`` per parameter).  torch-format
    dicts pass through unchanged.  See tests/reference/apex_fusedadam_state.md."""
    if not isinstance(sd, dict) or 'state' not in sd or 'param_groups' not in sd:
        raise UserError("optimizer file is not an optimizer state dict (no 'state'/'param_groups')")
    groups = sd['param_groups']
    if not any('bias_correction' in g for g in groups):  # apex-only key
        return sd
    state = {}
    for g in groups:
        step = float(g.get('step', 0))
        for p in g['params']:
            if p in sd['state'] and sd['state'][p]:
                s = dict(sd['state'][p])
                s.setdefault('step', torch.tensor(step, dtype=torch.float32))
                state[p] = s
    new_groups = [{k: v for k, v in g.items() if k not in ('bias_correction', 'step')} for g in groups]
    return {'state': state, 'param_groups': new_groups}


# Flags that choose the optimizer's implementation: they belong to this run, not to the file.
OPTIMIZER_IMPL_KEYS = ('fused', 'foreach', 'capturable', 'differentiable')


def load_optimizer_file(optimizer, path, verified=False):
    """Load an optimizer state file (ours, or the release's apex FusedAdam file) into
    ``optimizer``.  The param groups keep the optimizer's own implementation flags
    (fused/foreach/capturable/differentiable) whatever the file says or lacks, so loading
    decides the ``step`` tensors' device as this optimizer needs, and each state tensor
    (exp_avg, exp_avg_sq) is laid out like its parameter (a file written with the other
    --channels_last setting has the other strides; the fused kernels need them equal).
    A learning rate that is a tensor (--cuda_graphs: the device tensor the captured step
    reads) stays that very tensor; load_state_dict would put in the file's, a float or a
    tensor loaded onto the CPU.  (A float one becomes the file's, as in the release; the
    schedule sets it before every step anyway.)
    ``verified``: as for restore_params."""
    if not verified:
        check_recorded_checksum(path)
    sd = convert_apex_optimizer_state(safe_torch_load(path, 'optimizer state'))
    n_file = sum(len(g['params']) for g in sd['param_groups'])
    n_model = sum(len(g['params']) for g in optimizer.param_groups)
    if n_file != n_model or len(sd['param_groups']) != len(optimizer.param_groups):
        raise UserError(f"{path} holds optimizer state for {n_file} parameter tensors, the model has {n_model}; "
                        "is it from another preset?")
    own = [{k: g[k] for k in OPTIMIZER_IMPL_KEYS if k in g} for g in optimizer.param_groups]
    sd = dict(sd, param_groups=[dict(g, **flags) for g, flags in zip(sd['param_groups'], own)])
    own_lr = [g['lr'] for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError) as e:
        raise UserError(f"cannot load optimizer state {path}: {e}") from None
    for g, lr in zip(optimizer.param_groups, own_lr):
        if torch.is_tensor(lr):
            g['lr'] = lr
        g['decoupled_weight_decay'] = True  # AdamW's, even if the file says otherwise
        for p in g['params']:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)  # p's strides, v's values


def restore_log(path):
    """The release's log-based restore: (best eval elbo, step, epoch) from its
    eval_loss and train_loss lines."""
    loaded = read_log(path)
    train = [z for z in loaded if z.get('type') == 'train_loss']
    if not train:
        raise UserError(f"{path} has no train_loss lines, so step and epoch cannot be restored from it")
    evals = [z['elbo'] for z in loaded if z.get('type') == 'eval_loss']
    return (min(evals) if evals else float('inf')), max(z['step'] for z in train), max(z['epoch'] for z in train)


# ----------------------------------------------------------------------------- writing a set

def atomic_save(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_copy(src, dst):
    with atomic_write(dst) as f, open(src, 'rb') as fi:
        shutil.copyfileobj(fi, f)


def rng_state(device):
    rng = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng, device):
    torch.set_rng_state(rng['cpu'])
    if device.type == 'cuda' and 'cuda' in rng:
        torch.cuda.set_rng_state(rng['cuda'], device)


@dataclass
class Progress:
    """Where a run stands: what every -state.th records beside the weights, what restore
    returns and what train_loop advances step by step."""
    step: int = 0  # updates done (the number of the next step)
    epoch: int = 0
    batch: int = 0  # the next batch within the epoch
    best_eval: float = float('inf')  # the lowest validation ELBO so far (nats/dim)
    skipped: int = 0  # updates skipped since the run began
    data: tuple = None  # data_fingerprint of the training split


# the fields a resume carries over from the checkpoint ('data' is checked, then the current split's)
RESUMED = ('step', 'epoch', 'batch', 'best_eval', 'skipped')


def save_checkpoint(H, dist_info, name, model, ema, optimizer, scaler, log, progress):
    """Write {run_dir}/{name}-*.  Collective (every rank calls it); rank 0 writes.

    Each file is written atomically; -state.th, written last, records the size and CRC of
    the other four, so a set torn by a crash between renames is recognised and skipped.
    Before a new ``latest`` is written, the complete one becomes ``previous`` (keep_previous),
    so a crash while writing leaves at least one complete set."""
    rngs = gather_objects(rng_state(dist_info.device))
    if dist_info.is_main:
        prefix = os.path.join(H.run_dir, name)
        log(f'Saving model@ {progress.step} to {prefix}')
        if name == 'latest':
            keep_previous(H.run_dir)
        atomic_save(model.state_dict(), prefix + '-model.th')
        atomic_save(ema.state_dict(), prefix + '-model-ema.th')
        atomic_save(optimizer.state_dict(), prefix + '-opt.th')
        atomic_copy(log.jsonl_path, prefix + '-log.jsonl')
        files = {suffix: file_crc(prefix + suffix) for suffix in CHECKPOINT_FILES}
        atomic_save(dict(asdict(progress), rng=rngs, scaler=scaler.state_dict() if scaler else None, H=dict(H),
                         files=files, world_size=dist_info.world_size), prefix + '-state.th')
    barrier()


def keep_previous(run_dir):
    """Make a complete ``latest`` set the ``previous`` one, as hard links (no copy; a copy
    where the file system has no links).  previous-state.th goes first and comes back
    last, so a crash in between leaves ``previous`` incomplete, never mixed, and ``latest``
    untouched.  A torn ``latest`` never replaces ``previous``."""
    latest, previous = os.path.join(run_dir, 'latest'), os.path.join(run_dir, 'previous')
    if checkpoint_state(latest) is None:
        return
    if os.path.exists(previous + '-state.th'):
        os.remove(previous + '-state.th')
    for suffix in CHECKPOINT_FILES + ['-state.th']:
        src, dst = latest + suffix, previous + suffix
        if os.path.exists(dst) and os.path.samefile(src, dst):
            continue  # linked by an earlier call (renaming a link onto its twin would do nothing)
        tmp = f'{dst}.tmp.{os.getpid()}'
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


# ----------------------------------------------------------------------------- finding the newest complete set

def _state(prefix):
    """(training state recorded in {prefix}-state.th, None), or (None, why it is unreadable)."""
    try:
        state = safe_torch_load(prefix + '-state.th', 'training state')
    except UserError as e:
        return None, str(e)
    if isinstance(state, dict) and 'step' in state and 'files' in state:
        return state, None
    return None, f'{prefix}-state.th is not a training state (no step and file record)'


def damaged_files(prefix, state):
    """{suffix: what is wrong} for the files of the set {prefix}-* whose size or CRC differ
    from those its state ``state`` recorded (file_damage); empty when the set is complete."""
    damage = {}
    for s in CHECKPOINT_FILES:
        try:
            recorded = tuple(state['files'][s])
        except (KeyError, TypeError):
            damage[s] = 'not recorded in its -state.th'
            continue
        if (what := file_damage(prefix + s, recorded)) is not None:
            damage[s] = what
    return damage


def checkpoint_state(prefix):
    """The training state of the set {prefix}-* if all its files are present and match the
    sizes and CRCs recorded in {prefix}-state.th; None if it is incomplete or torn."""
    state, _ = _state(prefix)
    return state if state is not None and not damaged_files(prefix, state) else None


def _sets(run_dir):
    """[(state, prefix)] of the sets in run_dir whose -state.th is readable, newest first (by
    the step recorded; on a tie, latest); a warning names each set whose -state.th is not."""
    readable = []
    for f in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        if f.endswith('-state.th'):
            prefix = os.path.join(run_dir, f[:-len('-state.th')])
            state, why = _state(prefix)
            if state is None:
                print(f'warning: ignoring checkpoint {prefix}-*: its files cannot be checked, {why}', flush=True)
            else:
                readable.append((state, prefix))
    return sorted(readable, key=lambda c: (c[0]['step'], c[1].endswith('latest')), reverse=True)


def find_checkpoint(run_dir, need=CHECKPOINT_FILES):
    """(prefix, state) of the newest checkpoint set in run_dir whose files ``need`` (all four
    by default: to resume) match their record, or (None, None).  Sets are checked newest
    first, and only until one fits, so older sets' files are not read; each set passed over
    gets a warning line naming its damaged files and what is wrong with them (truncated, a
    checksum failure, ...) and the files that are still good."""
    prefix, state, _, _ = _find(run_dir, need)
    return prefix, state


def _find(run_dir, need):
    """find_checkpoint's (prefix, state), that set's damaged_files (files it does not need)
    and [(state, prefix, damaged_files)] of the sets passed over."""
    passed = []
    for state, prefix in _sets(run_dir):
        damage = damaged_files(prefix, state)
        if not any(s in damage for s in need):
            return prefix, state, damage, passed
        _warn_damaged(prefix, state, damage, 'ignoring incomplete checkpoint' if need == CHECKPOINT_FILES
                      else 'passing over checkpoint')
        passed.append((state, prefix, damage))
    return None, None, {}, passed


def _warn_damaged(prefix, state, damage, what):
    good = [os.path.basename(prefix) + s for s in CHECKPOINT_FILES if s not in damage]
    print(f'warning: {what} {prefix}-* (step {state["step"]}): '
          + '; '.join(f'{os.path.basename(prefix)}{s}: {why}' for s, why in damage.items())
          + f'; still good: {", ".join(good) if good else "none"}', flush=True)


def checkpoint_files(run_dir):
    """Names of the checkpoint files in run_dir, complete sets or not."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(f for f in os.listdir(run_dir) if f.endswith(tuple(CHECKPOINT_FILES + ['-state.th'])))


def set_aside(run_dir):
    """--restart: move everything in run_dir (files, and the TensorBoard event folder, which so
    stays a run of its own) into run_dir/before-restart-TIME/, so that a fresh start
    overwrites nothing.  Returns that folder, or None if run_dir held no files."""
    names = [f for f in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, f)) or f == EVENT_FOLDER] \
        if os.path.isdir(run_dir) else []
    if not names:
        return None
    folder = os.path.join(run_dir, 'before-restart-' + time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(folder)
    for f in names:
        os.replace(os.path.join(run_dir, f), os.path.join(folder, f))
    return folder


# ----------------------------------------------------------------------------- resuming

# Hyperparameters whose change makes the saved state mean something else: the seed (the
# data order), the architecture (the weights).  The batch is checked as the global batch,
# n_batch x processes (check_changes): that, not the per-process n_batch, sets the updates.
ARCH_KEYS = ['dataset', 'image_size', 'image_channels', 'width', 'zdim', 'enc_blocks', 'dec_blocks',
             'custom_width_str', 'bottleneck_multiple', 'no_bias_above', 'num_mixtures']
EXACT_RESUME_KEYS = ['seed'] + ARCH_KEYS


def changed_hparams(old, new):
    """{key: (old value, new value)} of the run's hyperparameters that differ."""
    return {k: (old[k], new[k]) for k in sorted(set(old) & set(new)) if k not in NOT_RUN_KEYS and old[k] != new[k]}


def data_fingerprint(source):
    """[number of images, CRC32 of 16 evenly spaced images] of a split, and the source's origin
    where it has one (prepared images: their manifest's sha256, which covers every source file's
    content hash and the preparation's options): recorded in each checkpoint, so that resuming on
    other data (the position in the epoch would point at other images) is noticed."""
    n = len(source)
    idx = np.unique(np.linspace(0, n - 1, min(n, 16)).astype(np.int64))
    return [n, zlib.crc32(np.ascontiguousarray(source[idx]).tobytes())] + ([source.origin] if source.origin else [])


def global_batch(n_batch, world_size):
    """The images of one update, in words: '--n_batch B x N processes = B*N'."""
    return f'--n_batch {n_batch} x {world_size} process{"es" if world_size > 1 else ""} = {n_batch * world_size}'


def check_changes(H, state, prefix, data_id, log, world_size=1):
    """Log the hyperparameters that differ from the checkpoint's (old -> new); refuse those
    that break an exact continuation unless --allow_changes (--test_eval only reads): the
    seed, the architecture, the training data and the global batch (n_batch x processes,
    which sets the updates and the order the images come in; the same global batch split
    over another number of processes continues the same run)."""
    if H.test_eval:
        return
    changes = changed_hparams(state['H'], H)
    if changes:
        log('hyperparameters changed since ' + os.path.basename(prefix) + ': '
            + ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items()))
    breaking = [k for k in changes if k in EXACT_RESUME_KEYS]
    old_batch, old_world = state['H']['n_batch'], state.get('world_size', 1)
    batch_changed = old_batch * old_world != H.n_batch * world_size
    if batch_changed:
        breaking.append(f'global batch ({global_batch(old_batch, old_world)} -> '
                        f'{global_batch(H.n_batch, world_size)} images per update)')
    if data_id is not None and state.get('data') is not None and list(state['data']) != list(data_id):
        breaking.append(f'training data ({state["data"][0]} -> {data_id[0]} images or their content)')
    if breaking and not H.allow_changes:
        why = ' (a changed global batch changes the optimisation and the order of the images)' if batch_changed else ''
        raise UserError(f"resuming {prefix} with changed {', '.join(breaking)} would not continue the same run{why}; "
                        "add --allow_changes to continue anyway, --restart to begin afresh, or use another --desc")


def resolve_weights(H):
    """Weights for the tools that read a run (evaluate.py, sample.py): (path, notes).
    --restore_ema_path / --restore_path win, else the EMA file of the run folder's newest
    checkpoint set whose EMA file is intact (its other files need not be; notes say what is
    damaged and when older weights are used).  The run's saved config (from its run folder,
    or from the -state.th beside an explicit weights file) becomes the default of every
    setting not given on the command line (``H.explicit``): its architecture, data_root,
    grid size, ..."""
    if H.restore_ema_path or H.restore_path:
        path = H.restore_ema_path or H.restore_path
        notes = [f'EMA weights {path}' if H.restore_ema_path else
                 f"weights {path} (not an EMA file: pass --restore_ema_path for the paper's numbers)"]
        saved = saved_run_config(path)
    else:
        # reading needs only the EMA file (and the set's -state.th, for the config): a set whose
        # other files are damaged still serves, and a damaged newest one falls back to an older set
        prefix, state, damage, passed = _find(H.run_dir, need=['-model-ema.th'])
        if prefix is None:
            raise UserError(no_weights(H.run_dir, passed))
        path, saved = prefix + '-model-ema.th', state.get('H')
        notes = [f'EMA weights {path} (step {state.get("step")})']
        if damage:
            notes.append('note: in the same set, ' + '; '.join(f'{os.path.basename(prefix)}{s}: {why}'
                                                               for s, why in damage.items())
                         + ' (reading needs only the intact EMA file; training resumes from another set)')
        if passed:
            newer = ', '.join(f'{os.path.basename(p)} (step {s["step"]})' for s, p, _ in passed)
            notes.append(f'note: these are not the newest weights of the run: the EMA file of {newer} is damaged '
                         '(see the warning above)')
    changed = apply_run_config(H, saved, set(H.explicit))
    if changed:
        notes.append(f"from the run's saved config: {changed}")
    return path, notes


def no_weights(run_dir, passed):
    """Why a run folder offers no EMA weights to read, and what to pass instead; ``passed``:
    _find's sets passed over."""
    if not checkpoint_files(run_dir):
        return (f"no weights to evaluate: {run_dir} holds no checkpoint; pass --restore_ema_path FILE, or the "
                "--save_dir/--desc of a run whose folder holds checkpoints")
    model = [p + '-model.th' for _, p, damage in passed if '-model.th' not in damage]
    return (f"no intact EMA weights in {run_dir}: every -model-ema.th there is damaged or cannot be checked (the "
            "warnings above say what is wrong with each); pass --restore_ema_path FILE"
            + (f", or --restore_path {model[0]} for the intact non-EMA weights of that set" if model else ""))


def check_restore_paths(H):
    for flag in ['restore_path', 'restore_ema_path', 'restore_log_path', 'restore_optimizer_path']:
        if H[flag] and not os.path.isfile(H[flag]):
            raise UserError(f"--{flag} {H[flag]}: no such file")


def restore(H, dist_info, model, ema, optimizer, scaler, log, found=None, data_id=None):
    """Apply --resume / the run folder's newest complete checkpoint, or the release's four
    restore flags (checked to exist by set_up).  ``found``: find_checkpoint's answer when the
    caller already has it; ``data_id``: data_fingerprint of the training split.  Returns
    the run's Progress (its ``data`` is left to the caller).

    Refuses (UserError) to start from zero in a folder whose checkpoints are all torn, and
    to resume with changed EXACT_RESUME_KEYS, global batch or data, unless --restart /
    --allow_changes (check_changes)."""
    progress = Progress()
    if H.resume and H.restart:
        raise UserError("--resume continues the run and --restart begins it afresh: pass one of them")
    prefix, state = (None, None) if H.restart else (found or find_checkpoint(H.run_dir))
    if H.resume and prefix is None:
        raise UserError(f"--resume: no complete checkpoint in {H.run_dir}; start without --resume "
                        "(or check --save_dir/--desc)")
    if prefix is None and not H.restart and (old := checkpoint_files(H.run_dir)):
        raise UserError(f"{H.run_dir} holds checkpoint files ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}) "
                        "but no complete set, so the run cannot continue; to begin afresh add --restart (the old "
                        "files are moved to a before-restart-* folder beside them), or pick another --desc")
    if prefix is not None:
        check_changes(H, state, prefix, data_id, log, dist_info.world_size)
        log(f'resuming from {prefix} (step {state["step"]}, epoch {state["epoch"]})')
        # find_checkpoint has checked every file's size and CRC against the set's record
        restore_params(model, prefix + '-model.th', H, verified=True)
        restore_params(ema, prefix + '-model-ema.th', H, verified=True)
        load_optimizer_file(optimizer, prefix + '-opt.th', verified=True)
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        rngs = state['rng']
        if len(rngs) == dist_info.world_size:
            set_rng_state(rngs[dist_info.rank], dist_info.device)
        elif (H.rank_invariant_noise or dist_info.world_size == 1) and same_states(rngs):
            # every rank drew the global batch's noise from one stream: it goes on, on every rank
            set_rng_state(rngs[0], dist_info.device)
            log(f'note: checkpoint written by {len(rngs)} process(es), now {dist_info.world_size}: data order and '
                'posterior noise continue (every process drew the same noise stream)')
        else:
            log(f'note: checkpoint written by {len(rngs)} process(es), now {dist_info.world_size}: data order is kept, '
                'posterior noise is reseeded (with --rank_invariant_noise on both sides it would continue)')
        progress = Progress(**{k: state[k] for k in RESUMED if k in state})
        progress.batch = position_in_epoch(H, dist_info, state, progress, data_id, log)
        return progress
    # load everything before logging anything, so a bad file leaves no trace in the run folder
    if H.restore_path:
        restore_params(model, H.restore_path, H)
    if H.restore_ema_path:
        restore_params(ema, H.restore_ema_path, H)
    elif H.restore_path:
        ema.load_state_dict(model.state_dict())
    if H.restore_optimizer_path:
        load_optimizer_file(optimizer, H.restore_optimizer_path)
    if H.restore_log_path:
        best, step, epoch = restore_log(H.restore_log_path)
        # the release restarts at the beginning of the epoch its log reached
        progress = Progress(step=step, epoch=epoch, batch=0, best_eval=best)
    for flag in ['restore_path', 'restore_ema_path', 'restore_optimizer_path', 'restore_log_path']:
        if H[flag]:
            log(f'restored --{flag} {H[flag]}')
    if H.restore_log_path:
        log(f'starting at epoch {progress.epoch}, step {progress.step} (from the log); '
            f'best eval elbo so far {progress.best_eval}')
    return progress


def same_states(rngs):
    """Whether every rank's saved RNG state (rng_state) is the same."""
    return all(set(r) == set(rngs[0]) and all(torch.equal(r[k], rngs[0][k]) for k in r) for r in rngs)


def position_in_epoch(H, dist_info, state, progress, data_id, log):
    """The next global batch of the epoch for this run.  It counts global batches (n_batch x
    processes); when their size changed (--allow_changes), the images already trained on
    this epoch are carried over, rounded down to whole new global batches (the images of
    the partial one are trained on again)."""
    old_global, new_global = state['H']['n_batch'] * state.get('world_size', 1), H.n_batch * dist_info.world_size
    batch = progress.batch
    if old_global == new_global or not batch:
        return batch
    images = batch * old_global
    batch, again = divmod(images, new_global)
    per_epoch = f' of {data.train_batches_per_epoch(data_id[0], H.n_batch, dist_info.world_size)}' if data_id else ''
    log(f'note: {images} images of epoch {progress.epoch} were trained on in global batches of '
        f'{global_batch(state["H"]["n_batch"], state.get("world_size", 1))}; '
        f'continuing at global batch {batch}{per_epoch} of this epoch, '
        f'in global batches of {global_batch(H.n_batch, dist_info.world_size)}'
        + (f' ({again} images of the last one are trained on again)' if again else ''))
    return batch


def load_for_evaluation(H, ema, log):
    """Weights for --test_eval: an explicit file wins, else the EMA file of the run folder's
    newest set whose EMA file is intact (its other files need not be).  Returns the step of
    that set (None for an explicit file)."""
    if H.restore_ema_path:
        restore_params(ema, H.restore_ema_path, H)
        log(f'evaluating EMA weights {H.restore_ema_path}')
    elif H.restore_path:
        restore_params(ema, H.restore_path, H)
        log(f'evaluating {H.restore_path} (not an EMA file: pass --restore_ema_path for the paper\'s numbers)')
    else:  # as sample.py and evaluate.py: the newest intact EMA file (resolve_weights)
        prefix, state, _, passed = _find(H.run_dir, need=['-model-ema.th'])
        if prefix is None:
            raise UserError(no_weights(H.run_dir, passed) if checkpoint_files(H.run_dir) else
                            f"--test_eval needs trained weights: pass --restore_ema_path FILE, or the --desc of a "
                            f"run whose folder ({H.run_dir}) holds checkpoints")
        restore_params(ema, prefix + '-model-ema.th', H, verified=True)  # _find checked its size and CRC
        log(f'evaluating EMA weights {prefix}-model-ema.th (step {state["step"]})')
        return state['step']


def open_run_folder(H, dist_info, progress, found, log):
    """After a successful start, and only then, write to the run folder (rank 0): move
    old files aside for --restart, remove temporaries of killed processes, write the held
    log lines, hparams.json (the run's first configuration) and one hparams.jsonl line per
    start (step, changes against the checkpoint resumed, full configuration)."""
    if not dist_info.is_main:
        return
    if H.restart and (folder := set_aside(H.run_dir)):
        log(f'--restart: moved the earlier files of {H.run_dir} to {folder}')
    os.makedirs(H.run_dir, exist_ok=True)
    if stale := remove_stale_temporaries(H.run_dir):
        log(f'removed {len(stale)} temporary file(s) of killed processes: {", ".join(stale)}')
    log.commit()
    state = None if H.restart else found[1]
    record = dict(step=progress.step, time=time.ctime(),
                  changed={k: list(v) for k, v in changed_hparams(state['H'], H).items()} if state else {}, H=dict(H))
    with open(os.path.join(H.run_dir, 'hparams.jsonl'), 'a') as f:
        print(json.dumps(record), file=f, flush=True)
    path = os.path.join(H.run_dir, 'hparams.json')
    if not os.path.exists(path):
        write_text(path, json.dumps(dict(H), indent=1, sort_keys=True))
