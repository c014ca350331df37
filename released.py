"""Fetch and verify the released VDVAE checkpoints (the official release's files, unchanged).

    python released.py list                                # every released file and its URL
    python released.py fetch cifar10 [DIR]                 # the four seeds' EMA weights
    python released.py fetch imagenet32 [DIR] --all        # + -model.th, -opt.th, -log.jsonl (to train on)
    python released.py verify ffhq1024 [DIR]               # re-check files already in DIR

DIR defaults to ./checkpoints.  Downloads resume where they stopped (HTTP Range requests into
FILE.part).  Every file is verified before use: a state dict must load with
torch.load(weights_only=True) and have the keys and shapes of the preset's model (built on the
meta device); an optimizer file must hold state for that model's parameters; a log must hold
train_loss lines.  A verified file gets a stamp FILE.verified (size, sha256, the architecture it
was checked against), so it is never downloaded or loaded again; a file that fails is fetched again.
The released ffhq1024 files have two encoder blocks fewer than the ffhq1024 preset builds
(openai/vdvae issue 3: "Missing key(s) ... encoder.enc_blocks.68 ... 69"); verification finds the
encoder layer string that fits the file and records it in the stamp, and reproduce.py passes it on
as --enc_blocks.

The base URL (default: the release's) can be replaced by --base_url or the environment variable
VDVAE_CHECKPOINT_URL, for a mirror that holds the same folders and file names.  Any flag of hps.py
(--width, --enc_blocks, ...) changes the architecture the files are checked against.
"""
import argparse
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from checkpoints import (ENC_BLOCKS, SHAPE_KEYS, block_count, describe_mismatch, load_state_dict_file, model_shapes,
                         safe_torch_load)
from hps import Hyperparams, UserError, add_vae_arguments, parse_args_and_update_hparams
from utils import read_log, run_main, write_text
from vae import VAE

RELEASE_URL = 'https://openaipublic.blob.core.windows.net/very-deep-vaes-assets'
URL_ENV = 'VDVAE_CHECKPOINT_URL'
DEFAULT_DIR = './checkpoints'


@dataclass(frozen=True)
class Release:
    """One released checkpoint: {base}/{folder}/{name}{suffix} for each of its files."""
    preset: str
    name: str
    folder: str
    published_bpd: str  # the test-set bits/dim the release's README gives, as printed there
    bundle: bool  # True: the release also has -model.th, -opt.th and -log.jsonl


# The release's README ("Restoring saved models"), file for file.  cifar10: EMA weights only.
RELEASES = [
    Release('cifar10', 'cifar10-seed0-iter-900000', 'vdvae-assets-2', '2.879', False),
    Release('cifar10', 'cifar10-seed1-iter-1050000', 'vdvae-assets-2', '2.842', False),
    Release('cifar10', 'cifar10-seed2-iter-650000', 'vdvae-assets-2', '2.898', False),
    Release('cifar10', 'cifar10-seed3-iter-1050000', 'vdvae-assets-2', '2.864', False),
    Release('imagenet32', 'imagenet32-iter-1700000', 'vdvae-assets', '3.80', True),
    Release('imagenet64', 'imagenet64-iter-1600000', 'vdvae-assets-2', '3.52', True),
    Release('ffhq256', 'ffhq256-iter-1700000', 'vdvae-assets', '0.61', True),
    Release('ffhq1024', 'ffhq1024-iter-1700000', 'vdvae-assets', '2.42', True),
]
# The paper's figure for a preset with several released checkpoints (the mean over cifar10's seeds).
PUBLISHED_MEAN_BPD = {'cifar10': '2.87'}
EMA, BUNDLE = '-model-ema.th', ('-model.th', '-opt.th', '-log.jsonl')
CHUNK = 1 << 20


class WrongFile(UserError):
    """A file that reads fine but is not what the release's name promises (another model,
    not an optimizer state, not a log): fetching it again would give the same bytes."""


def releases(preset):
    found = [r for r in RELEASES if r.preset == preset]
    if not found:
        raise UserError(f"no released checkpoint for preset {preset!r}; released: "
                        f"{', '.join(dict.fromkeys(r.preset for r in RELEASES))}")
    return found


def release_files(rel, everything=False):
    """File names of a release: its EMA weights, and with ``everything`` the rest of its bundle."""
    return [rel.name + s for s in ((EMA,) + (BUNDLE if everything and rel.bundle else ()))]


def file_url(rel, fname, base_url=None):
    base = (base_url or os.environ.get(URL_ENV) or RELEASE_URL).rstrip('/')
    return f'{base}/{rel.folder}/{fname}'


# ----------------------------------------------------------------------------- architecture

class _LenientParser(argparse.ArgumentParser):
    """Takes the hps.py flags out of a command line and ignores the rest (train.py's or
    evaluate.py's own flags)."""

    def parse_args(self, args=None, namespace=None):
        return self.parse_known_args(args, namespace)[0]


def hparams_for(preset_name, argv=()):
    """H of ``preset_name`` with any hps.py flags in ``argv`` applied (others ignored)."""
    parser = _LenientParser(add_help=False)
    add_vae_arguments(parser)
    return parse_args_and_update_hparams(Hyperparams(), parser, ['--hps', preset_name, *argv])


def _encoder_block_signatures(shapes, n):
    """Per encoder block of a state dict: (shapes of c1..c4 weights and biases), or None if
    the block is incomplete."""
    sig = []
    for i in range(n):
        keys = [f'encoder.enc_blocks.{i}.{c}.{p}' for c in ('c1', 'c2', 'c3', 'c4') for p in ('weight', 'bias')]
        sig.append(tuple(shapes.get(k) for k in keys) if all(k in shapes for k in keys) else None)
    return sig


def _removals(caps, k):
    """Ways to take k blocks out of runs with caps[i] blocks each, taking them from the last
    runs first (lowest resolutions first)."""
    if not caps:
        if k == 0:
            yield []
        return
    for take in range(min(k, caps[-1]), -1, -1):
        for rest in _removals(caps[:-1], k - take):
            yield rest + [take]


def _token_res(t):
    """'32x11' / '32d2' / '32' -> 32."""
    return int(t.split('x')[0].split('d')[0])


def _expand(tokens):
    """Resolution of every block of an encoder layer string's tokens."""
    return [_token_res(t) for t in tokens for _ in range(int(t.split('x')[1]) if 'x' in t else 1)]


def fit_encoder_string(shapes, H, max_missing=8):
    """A layer string for the encoder of the state dict ``shapes`` ({name: shape}), made from
    H.enc_blocks by shortening its ``RxN`` runs, or None.

    The released ffhq1024 files lack blocks 68 and 69 of the 70 the preset builds.  A block's
    shapes depend only on its resolution's width and on whether its 3x3 convs are 1x1
    (resolutions <= 2), so the file's block shapes decide which runs are shorter, up to runs of
    identical shapes; among those, the last runs (lowest resolutions) are shortened first."""
    tokens = H.enc_blocks.split(',')
    model = model_shapes(H)
    n_file, n_model = block_count(shapes, ENC_BLOCKS), block_count(model, ENC_BLOCKS)
    if not 0 < n_model - n_file <= max_missing:
        return None
    want = _encoder_block_signatures(shapes, n_file)
    sig = dict(zip(_expand(tokens), _encoder_block_signatures(model, n_model)))  # resolution -> block shapes
    runs = [i for i, t in enumerate(tokens) if 'x' in t]
    for take in _removals([int(tokens[i].split('x')[1]) for i in runs], n_model - n_file):
        cut = dict(zip(runs, take))
        new = [f"{t.split('x')[0]}x{int(t.split('x')[1]) - cut[i]}" if i in cut else t for i, t in enumerate(tokens)]
        new = [t for t in new if not t.endswith('x0')]
        if [sig[r] for r in _expand(new)] != want:
            continue
        candidate = ','.join(new)
        if model_shapes(Hyperparams(H, enc_blocks=candidate)) == shapes:
            return candidate
    return None


def check_shapes(shapes, H, what):
    """{} when ``shapes`` are VAE(H)'s; {'enc_blocks': s} when they are VAE(H)'s with a
    shorter encoder (the ffhq1024 quirk); else a UserError that says what the file is."""
    if model_shapes(H) == shapes:
        return {}
    fitted = fit_encoder_string(shapes, H)
    if fitted is not None:
        return {'enc_blocks': fitted}
    with torch.device('meta'):
        model = VAE(H)
    raise WrongFile(describe_mismatch(model, {k: torch.empty(s, device='meta') for k, s in shapes.items()}, what, H))


# ----------------------------------------------------------------------------- verification

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path, H, what=None):
    """Check one released file against the architecture H; returns the overrides it needs
    ({} or {'enc_blocks': ...}).  Raises UserError saying what is wrong."""
    what = what or path
    if path.endswith('.th') and not path.endswith('-opt.th'):
        sd = load_state_dict_file(path)  # weights_only load; 'module.' prefixes stripped
        return check_shapes({k: tuple(v.shape) for k, v in sd.items()}, H, what)
    if path.endswith('-opt.th'):
        sd = safe_torch_load(path, 'optimizer state')
        if not (isinstance(sd, dict) and isinstance(sd.get('param_groups'), list) and 'state' in sd):
            raise WrongFile(f"{what} is not an optimizer state (no 'state' and 'param_groups')")
        n_file = sum(len(g['params']) for g in sd['param_groups'])
        n_model = len(model_shapes(H))  # every VAE state-dict entry is a parameter
        if n_file != n_model:
            raise WrongFile(f"{what} holds optimizer state for {n_file} parameter tensors, the {H.hparam_sets!r} "
                            f"model has {n_model}")
        return {}
    if not any(z.get('type') == 'train_loss' for z in read_log(path)):
        raise WrongFile(f"{what} has no train_loss lines: not a run log")
    return {}


def _stamp_path(path):
    return path + '.verified'


def _arch(H):
    return {k: H[k] for k in SHAPE_KEYS}


def read_stamp(path, H):
    """The stamp of ``path`` if it vouches for this file (same size and sha256) and this
    architecture; else None."""
    try:
        with open(_stamp_path(path)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(path) or stamp.get('size') != os.path.getsize(path) or stamp.get('arch') != _arch(H):
        return None
    return stamp if stamp.get('sha256') == sha256_of(path) else None


def write_stamp(path, H, overrides, url):
    stamp = dict(file=os.path.basename(path), size=os.path.getsize(path), sha256=sha256_of(path), arch=_arch(H),
              overrides=overrides, url=url, verified=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    write_text(_stamp_path(path), json.dumps(stamp, indent=1))
    return stamp


# ----------------------------------------------------------------------------- download

def _total_size(resp, start):
    """Size of the whole remote file from a 200 or 206 response, or None."""
    cr = resp.headers.get('Content-Range')  # "bytes 100-999/1000"
    if cr and '/' in cr and cr.rsplit('/', 1)[1].strip().isdigit():
        return int(cr.rsplit('/', 1)[1])
    cl = resp.headers.get('Content-Length')
    return int(cl) + start if cl is not None and cl.isdigit() else None


def download(url, dest, retries=5, timeout=60, say=print):
    """Download ``url`` to ``dest`` through ``dest``.part, resuming a partial file with an HTTP
    Range request (from an earlier run or after a dropped connection).  The finished file is
    renamed to ``dest``; returns its size."""
    part = dest + '.part'
    for attempt in range(retries + 1):
        start = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url, headers={'Range': f'bytes={start}-'} if start else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if start and resp.status == 200:  # the server ignored the range: start over
                    say(f'{url}: the server does not resume downloads; starting again from byte 0')
                    start = 0
                total = _total_size(resp, start)
                if start:
                    say(f'resuming {os.path.basename(dest)} at byte {start:,} of {total or "?":,}')
                with open(part, 'ab' if start else 'wb') as f:
                    got = start
                    for chunk in iter(lambda: resp.read(CHUNK), b''):
                        f.write(chunk)
                        got += len(chunk)
                if total is None or got == total:
                    os.replace(part, dest)
                    return got
                say(f'{url}: connection closed after {got:,} of {total:,} bytes; resuming')
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:  # nothing left past the end: the .part is stale or complete
                total = _total_size(e, 0) if e.headers.get('Content-Range', '').startswith('bytes */') else None
                if total == start:
                    os.replace(part, dest)
                    return start
                say(f'{url}: the partial file {part} does not fit the remote file; starting again')
                os.remove(part)
                continue
            raise UserError(f"cannot download {url}: HTTP {e.code} {e.reason}; check the URL "
                            f"(--base_url or ${URL_ENV}, now {os.environ.get(URL_ENV) or 'unset'})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut
            reason = getattr(e, 'reason', e)
            if attempt == retries:
                raise UserError(f"cannot download {url}: {reason}; run the same command again to resume "
                                f"({part} keeps what arrived)") from None
            say(f'{url}: {reason}; retrying ({attempt + 1}/{retries})')
            time.sleep(min(2 ** attempt, 30) * _RETRY_DELAY)
    raise UserError(f"cannot download {url}: it keeps stopping early; run the same command again to resume")


_RETRY_DELAY = 1.0  # seconds, doubled each retry (tests set 0)


def fetch_file(rel, fname, folder, H, base_url=None, say=print):
    """Make ``folder/fname`` a verified copy of the released file; returns its stamp."""
    path = os.path.join(folder, fname)
    url = file_url(rel, fname, base_url)
    stamp = read_stamp(path, H)
    if stamp is not None:
        say(f'{fname}: already downloaded and verified (sha256 {stamp["sha256"][:12]}...)')
        return stamp
    if os.path.exists(path):  # e.g. fetched by hand, cut short, or stamped for another architecture
        try:
            return _verified(path, H, url, say)
        except WrongFile as e:  # reads fine: kept, since it may be right and the flags wrong
            raise UserError(f"{e}\n{path} is kept: check the preset and the hps.py flags, or move the file away "
                            "to fetch the release's again") from None
        except UserError as e:
            say(f'{fname} is truncated or corrupt ({_first_line(e)}): fetching it again')
            os.remove(path)
    os.makedirs(folder, exist_ok=True)
    for attempt in (1, 2):
        say(f'downloading {url}')
        download(url, path, say=say)
        try:
            return _verified(path, H, url, say)
        except UserError as e:
            os.remove(path)
            if attempt == 2 or isinstance(e, WrongFile):  # the server holds this very file
                raise UserError(f"{url} did not give a usable file: {e}") from None
            say(f'{fname} arrived broken ({_first_line(e)}): fetching it again')


def _first_line(e):
    return str(e).splitlines()[0]


def _verified(path, H, url, say):
    overrides = verify_file(path, H, what=os.path.basename(path))
    stamp = write_stamp(path, H, overrides, url)
    note = f' with {" ".join(f"--{k} {v}" for k, v in overrides.items())}' if overrides else ''
    say(f'{os.path.basename(path)}: verified{note} ({stamp["size"]:,} bytes, sha256 {stamp["sha256"][:12]}...)')
    if overrides:
        say(f'  note: the file does not fit the {H.hparam_sets!r} preset\'s layer strings as they are; it fits'
            f'{note}, which reproduce.py passes on by itself')
    return stamp


def fetch(preset, folder=DEFAULT_DIR, everything=False, base_url=None, argv=(), say=print):
    """Fetch and verify the released EMA weights of ``preset`` (and with ``everything`` the
    rest of each bundle).  Returns [(Release, path of the EMA file, its stamp)]."""
    H = hparams_for(preset, argv)
    out = []
    for rel in releases(preset):
        H_rel = H
        for fname in release_files(rel, everything):  # the EMA file first: its overrides apply to the rest
            stamp = fetch_file(rel, fname, folder, H_rel, base_url, say)
            if fname.endswith(EMA):
                out.append((rel, os.path.join(folder, fname), stamp))
                H_rel = Hyperparams(H, **stamp['overrides'])
    if everything and not any(rel.bundle for rel in releases(preset)):
        say(f'note: the release has only EMA weights for {preset}')
    return out


def verify(preset, folder=DEFAULT_DIR, argv=(), say=print):
    """Verify the files of ``preset`` present in ``folder`` from scratch (stamps rewritten)."""
    H = hparams_for(preset, argv)
    found = 0
    for rel in releases(preset):
        H_rel = H
        for fname in release_files(rel, everything=True):
            path = os.path.join(folder, fname)
            if os.path.exists(path):
                stamp = _verified(path, H_rel, file_url(rel, fname), say)
                H_rel = Hyperparams(H, **stamp['overrides']) if fname.endswith(EMA) else H_rel
                found += 1
    if not found:
        raise UserError(f"no {preset} checkpoint files in {folder}; fetch them with ./setup_checkpoints.sh {preset} "
                        f"{folder}")


def main(argv=None):
    parser = argparse.ArgumentParser(description='Fetch and verify the released VDVAE checkpoints.',
                                     epilog='Any flag of hps.py (--width, --enc_blocks, ...) changes the '
                                            'architecture the files are checked against.')
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('list', help='print every released file and its URL')
    for name, text in [('fetch', 'download (resuming) and verify a preset\'s checkpoints'),
                       ('verify', 'verify the files of a preset already in DIR')]:
        p = sub.add_parser(name, help=text)
        p.add_argument('preset', choices=list(dict.fromkeys(r.preset for r in RELEASES)))
        p.add_argument('dir', nargs='?', default=DEFAULT_DIR, help=f'where the files go (default {DEFAULT_DIR})')
        if name == 'fetch':
            p.add_argument('--all', action='store_true',
                           help='also -model.th, -opt.th and -log.jsonl (to continue training; not for cifar10)')
            p.add_argument('--base_url', default=None,
                           help=f'a mirror with the release\'s folders and names (default ${URL_ENV} or {RELEASE_URL})')
    args, rest = parser.parse_known_args(argv)
    if args.command == 'list':
        for rel in RELEASES:
            for fname in release_files(rel, everything=True):
                print(f'{rel.preset:11s} {file_url(rel, fname)}')
        return
    known = set(hparams_for(args.preset)) | {'hps'}
    bad = [a for a in rest if a.startswith('--') and a[2:].split('=')[0] not in known]
    if bad:
        raise UserError(f"unknown flag {bad[0]}; released.py takes --all, --base_url and the flags of hps.py")
    if args.command == 'fetch':
        got = fetch(args.preset, args.dir, args.all, args.base_url, rest)
        print(f'{len(got)} {args.preset} EMA checkpoint(s) ready in {args.dir}: '
              f'./reproduce.sh {args.preset} evaluates them on the test set')
    else:
        verify(args.preset, args.dir, rest)


if __name__ == '__main__':
    run_main(main)
