"""Fetching the released checkpoints and reproducing the paper's table, offline: a loopback HTTP
server serves the tiny32 reference bundle under the release's file names."""
import collections
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import released
from conftest import ref
from hps import HPARAMS_REGISTRY, Hyperparams, UserError, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = json.load(open(ref('state_dict_manifest.json')))
TINY_H = json.load(open(ref('tiny32', 'config.json')))['H']
# the tiny32 architecture as hps.py flags (the rest of its config is the cifar10 preset's)
TINY = ['--width', '32', '--zdim', '4', '--num_mixtures', '3', '--enc_blocks', TINY_H['enc_blocks'],
        '--dec_blocks', TINY_H['dec_blocks']]
RUN = ['--threads', '1', '--num_workers', '0', '--no_progress', '--n_batch_eval', '100']


def read(*parts):
    with open(ref(*parts), 'rb') as f:
        return f.read()


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def release_style_model(ema_bytes):
    """A -model.th as the release wrote it: DDP's 'module.' before every key."""
    sd = torch.load(io.BytesIO(ema_bytes), weights_only=True)
    return torch_bytes({'module.' + k: v for k, v in sd.items()})


class ReleaseServer(ThreadingHTTPServer):
    """Serves ``files`` ({url path: bytes}) on 127.0.0.1 with HTTP Range support.  The first
    request for a path in ``drop_after`` ends the connection after that many bytes; the first
    request for a path in ``corrupt_once`` gets those bytes instead.  ``requests`` records
    (path, Range header) of every request."""
    daemon_threads = True

    def __init__(self, files):
        super().__init__(('127.0.0.1', 0), _Handler)
        self.files, self.drop_after, self.corrupt_once = dict(files), {}, {}
        self.requests = []
        self.hits = collections.Counter()

    @property
    def url(self):
        return f'http://127.0.0.1:{self.server_address[1]}'

    def paths_requested(self, name):
        return [r for p, r in self.requests if p.endswith('/' + name)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_GET(self):
        srv = self.server
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        first = srv.hits[self.path] == 0
        srv.hits[self.path] += 1
        rng = self.headers.get('Range')
        srv.requests.append((self.path, rng))
        if first and self.path in srv.corrupt_once:
            body = srv.corrupt_once[self.path]
        start = int(rng.split('=')[1].split('-')[0]) if rng else 0
        if start >= len(body):
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(body)}')
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.send_header('Content-Length', str(len(body) - start))
        self.end_headers()
        data = body[start:]
        if first and self.path in srv.drop_after:  # the connection dies mid-file
            data = data[:srv.drop_after[self.path]]
            self.close_connection = True
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """The release's layout for cifar10 (four EMA files) and imagenet32 (the four-file bundle),
    holding the tiny32 reference weights.  Stops with the test, or after 5 minutes at most."""
    ema, perturbed = read('tiny32', 'tiny32-iter-10-model-ema.th'), read('tiny32_perturbed', 'model.th')
    files = {}
    for i, rel in enumerate(released.releases('cifar10')):
        files[f'/{rel.folder}/{rel.name}-model-ema.th'] = ema if i < 2 else perturbed
    rel = released.releases('imagenet32')[0]
    for suffix, body in [('-model-ema.th', ema), ('-model.th', release_style_model(ema)),
                         ('-opt.th', read('tiny32', 'tiny32-iter-10-opt.th')),
                         ('-log.jsonl', read('tiny32', 'tiny32-iter-10-log.jsonl'))]:
        files[f'/{rel.folder}/{rel.name}{suffix}'] = body
    srv = ReleaseServer(files)
    thread = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    watchdog = threading.Timer(300, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv
    finally:
        watchdog.cancel()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(released, '_RETRY_DELAY', 0.0)
    monkeypatch.delenv(released.URL_ENV, raising=False)


def fetch(preset_name, folder, srv, everything=False, argv=TINY):
    said = []
    got = released.fetch(preset_name, str(folder), everything=everything, base_url=srv.url, argv=argv,
                            say=said.append)
    return got, '\n'.join(said)


def sha256(b):
    return hashlib.sha256(b).hexdigest()


# ----------------------------------------------------------------------------- fetching

def test_complete_fetch_of_a_bundle_then_nothing_twice(server, tmp_path):
    got, said = fetch('imagenet32', tmp_path, server, everything=True)
    rel = released.releases('imagenet32')[0]
    for suffix in ['-model-ema.th', '-model.th', '-opt.th', '-log.jsonl']:
        path = tmp_path / (rel.name + suffix)
        served = server.files[f'/{rel.folder}/{rel.name}{suffix}']
        assert path.read_bytes() == served
        stamp = json.load(open(str(path) + '.verified'))
        assert stamp['size'] == len(served) and stamp['sha256'] == sha256(served) and stamp['overrides'] == {}
        assert not os.path.exists(str(path) + '.part')
    # the release's -model.th carries DDP's 'module.' prefix: it is stripped and the file verifies
    assert next(iter(torch.load(tmp_path / (rel.name + '-model.th'), weights_only=True))).startswith('module.')
    assert [(r, p, s['sha256']) for r, p, s in got] == [(rel, str(tmp_path / (rel.name + '-model-ema.th')),
                                                         sha256(server.files[f'/{rel.folder}/{rel.name}-model-ema.th']))]
    n = len(server.requests)
    assert n == 4
    got2, said2 = fetch('imagenet32', tmp_path, server, everything=True)
    assert len(server.requests) == n, 'a verified file was downloaded again'
    assert said2.count('already downloaded and verified') == 4 and got2 == got


def test_interrupted_fetch_resumes_where_it_stopped(server, tmp_path):
    rels = released.releases('cifar10')
    names = [r.name + '-model-ema.th' for r in rels]
    server.drop_after[f'/{rels[0].folder}/{names[0]}'] = 100_000  # the connection dies after 100 kB
    body1 = server.files[f'/{rels[1].folder}/{names[1]}']
    (tmp_path / (names[1] + '.part')).write_bytes(body1[:250_000])  # left over from an earlier run
    got, said = fetch('cifar10', tmp_path, server)
    assert len(got) == 4
    assert server.paths_requested(names[0]) == [None, 'bytes=100000-']
    assert 'connection closed after 100,000 of' in said and 'resuming' in said
    assert server.paths_requested(names[1]) == ['bytes=250000-']
    for rel, name in zip(rels, names):
        assert (tmp_path / name).read_bytes() == server.files[f'/{rel.folder}/{name}']


def test_corrupt_files_are_refused_and_fetched_again(server, tmp_path):
    rels = released.releases('cifar10')
    names = [r.name + '-model-ema.th' for r in rels]
    good = [server.files[f'/{r.folder}/{n}'] for r, n in zip(rels, names)]
    (tmp_path / names[0]).write_bytes(good[0][:len(good[0]) // 2])  # a truncated file in the folder
    server.corrupt_once[f'/{rels[1].folder}/{names[1]}'] = bytes(len(good[1]))  # garbage from the server
    got, said = fetch('cifar10', tmp_path, server)
    assert f'{names[0]} is truncated or corrupt (cannot read state dict' in said
    assert f'{names[1]} arrived broken' in said
    assert server.hits[f'/{rels[1].folder}/{names[1]}'] == 2
    for name, body in zip(names, good):
        assert (tmp_path / name).read_bytes() == body
    # a verified file changed on disk afterwards no longer matches its stamp: checked, refused, fetched
    with open(tmp_path / names[2], 'r+b') as f:
        f.truncate(1000)
    n = server.hits[f'/{rels[2].folder}/{names[2]}']
    got, said = fetch('cifar10', tmp_path, server)
    assert f'{names[2]} is truncated or corrupt' in said and server.hits[f'/{rels[2].folder}/{names[2]}'] == n + 1
    assert (tmp_path / names[2]).read_bytes() == good[2]


def test_wrong_preset_file_gets_a_clear_message(server, tmp_path, monkeypatch):
    # the server's "cifar10" files hold the tiny model; checked against the real cifar10 preset
    monkeypatch.setitem(HPARAMS_REGISTRY, 'tiny32', Hyperparams(HPARAMS_REGISTRY['cifar10'], **{
        k: TINY_H[k] for k in ('width', 'zdim', 'num_mixtures', 'enc_blocks', 'dec_blocks')}))
    with pytest.raises(UserError) as e:
        fetch('cifar10', tmp_path, server, argv=())
    msg = str(e.value)
    assert msg.startswith(f'{server.url}/vdvae-assets-2/cifar10-seed0-iter-900000-model-ema.th did not give a usable')
    assert 'cifar10-seed0-iter-900000-model-ema.th does not fit the model built from --hps cifar10' in msg
    assert "it looks like a checkpoint of the 'tiny32' preset, run with --hps tiny32" in msg
    assert 'the file has width 32, the model 384' in msg and '461 tensors in the file, 1393 in the model' in msg
    assert server.hits['/vdvae-assets-2/cifar10-seed0-iter-900000-model-ema.th'] == 1, 'a wrong file is not refetched'
    assert not list(tmp_path.glob('*.th')), 'a refused file must not stay where it would be used'
    # a file already in the folder that reads fine but does not fit is kept (the flags may be wrong)
    kept = tmp_path / 'cifar10-seed0-iter-900000-model-ema.th'
    kept.write_bytes(server.files['/vdvae-assets-2/cifar10-seed0-iter-900000-model-ema.th'])
    with pytest.raises(UserError, match=f'{kept} is kept: check the preset and the hps.py flags'):
        fetch('cifar10', tmp_path, server, argv=())
    assert kept.exists() and server.hits['/vdvae-assets-2/cifar10-seed0-iter-900000-model-ema.th'] == 1


def test_command_line_errors_are_one_line(server, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, 'released.py', *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    p = cli('fetch', 'cifar10', str(tmp_path), '--base_url', server.url + '/nothing-here', *TINY)
    assert p.returncode == 2 and p.stderr.count('\n') == 1
    assert p.stderr.startswith(f'error: cannot download {server.url}/nothing-here/vdvae-assets-2/cifar10-seed0-')
    assert 'HTTP 404' in p.stderr and '--base_url' in p.stderr
    p = cli('fetch', 'cifar10', str(tmp_path), '--widht', '32')
    assert p.returncode == 2 and p.stderr.startswith('error: unknown flag --widht')
    # the environment variable points at a mirror just as --base_url does
    p = subprocess.run([sys.executable, 'released.py', 'fetch', 'cifar10', str(tmp_path), *TINY], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, VDVAE_CHECKPOINT_URL=server.url))
    assert p.returncode == 0, p.stderr
    assert '4 cifar10 EMA checkpoint(s) ready' in p.stdout and len(server.paths_requested(
        'cifar10-seed3-iter-1050000-model-ema.th')) == 1


# ----------------------------------------------------------------------------- the ffhq1024 quirk

def manifest_shapes(name, drop=()):
    return {k: tuple(s) for k, s, _ in MANIFEST[name]['keys'] if not any(k.startswith(p) for p in drop)}


def test_ffhq1024_release_files_get_the_layer_string_that_fits():
    """The release's ffhq1024 files lack encoder blocks 68 and 69 (openai/vdvae issue 3: missing
    keys, no shape mismatch): blocks 66 and 67 keep the 1x1-resolution shapes, so the file's
    encoder ends in 1x2 where the preset says 1x4."""
    H = preset('ffhq1024')
    assert released.model_shapes(H) == manifest_shapes('ffhq1024')  # the release's manifest
    assert released.check_shapes(manifest_shapes('ffhq1024'), H, 'x') == {}
    shapes = manifest_shapes('ffhq1024', drop=('encoder.enc_blocks.68.', 'encoder.enc_blocks.69.'))
    fitted = released.check_shapes(shapes, H, 'ffhq1024-iter-1700000-model-ema.th')
    assert fitted == {'enc_blocks': H.enc_blocks.replace('4d4,1x4', '4d4,1x2')}
    assert released.model_shapes(preset('ffhq1024', enc_blocks=fitted['enc_blocks'])) == shapes


def test_fitted_encoder_follows_the_block_shapes():
    """Where the shapes decide (3x3 convs at resolution 4, 1x1 at resolution 1) the run that is
    really shorter is found; a decoder mismatch is never 'fitted'."""
    H = preset('cifar10')
    short4 = H.enc_blocks.replace('4x3,4d4', '4x1,4d4')
    assert released.fit_encoder_string(released.model_shapes(preset('cifar10', enc_blocks=short4)), H) == short4
    short1 = H.enc_blocks.replace('1x3', '1x1')
    assert released.fit_encoder_string(released.model_shapes(preset('cifar10', enc_blocks=short1)), H) == short1
    dec = released.model_shapes(preset('cifar10', dec_blocks=H.dec_blocks.replace('32x21', '32x20')))
    with pytest.raises(UserError, match='The file has 42 decoder blocks'):
        released.check_shapes(dec, H, 'x')


# ----------------------------------------------------------------------------- reproduce

def test_comparison_rule():
    from reproduce import compare, last_digit, mean_row
    assert last_digit('3.80') == pytest.approx(0.005) and last_digit('2.879') == pytest.approx(0.0005)
    c = compare(2.8890, 0.0050, '2.879')  # 0.010 <= 2 * 0.005 + 0.0005
    assert c['within_noise'] and c['diff_bpd'] == pytest.approx(0.010) and c['tolerance_bpd'] == pytest.approx(0.0105)
    assert not compare(2.8900, 0.0050, '2.879')['within_noise']
    assert not compare(3.7, 0.01, '3.80')['within_noise'] and compare(3.796, 0.0, '3.80')['within_noise']
    rows = [dict(measured_bpd=m, measured_bpd_se=s, n_images=10) for m, s in [(2.88, 0.01), (2.86, 0.03)]]
    m = mean_row('cifar10', rows)
    assert m['measured_bpd'] == pytest.approx(2.87) and m['measured_bpd_se'] == pytest.approx(0.02)
    assert m['published_bpd'] == '2.87' and m['within_noise'] and m['se_is_upper_bound']


@pytest.fixture
def cifar_root(tmp_path):
    """cifar-10-batches-py with 5 x 1050 training images and 200 test images."""
    folder = tmp_path / 'data' / 'cifar-10-batches-py'
    os.makedirs(folder)
    rng = np.random.RandomState(1)
    for name, n in [(f'data_batch_{i}', 1050) for i in range(1, 6)] + [('test_batch', 200)]:
        with open(folder / name, 'wb') as f:
            pickle.dump({b'data': rng.randint(0, 256, (n, 3072)).astype(np.uint8), b'labels': [0] * n}, f)
    return str(tmp_path / 'data')


def test_reproduce_end_to_end(server, cifar_root, tmp_path):
    """Data set-up, fetch, test-set evaluation, the importance-weighted bound and the printed
    comparison, for the four 'cifar10' seeds; the fourth file lacks its last encoder block
    (as the released ffhq1024 files do), and the layer string that fits it is passed on."""
    rels = released.releases('cifar10')
    sd = torch.load(io.BytesIO(server.files[f'/{rels[3].folder}/{rels[3].name}-model-ema.th']), weights_only=True)
    server.files[f'/{rels[3].folder}/{rels[3].name}-model-ema.th'] = torch_bytes(
        {k: v for k, v in sd.items() if not k.startswith('encoder.enc_blocks.13.')})
    out, ck = tmp_path / 'out', tmp_path / 'ck'
    p = subprocess.run([sys.executable, 'reproduce.py', 'cifar10', '--data_root', cifar_root, '--checkpoint_dir',
                        str(ck), '--out', str(out), '--base_url', server.url, '--n_importance', '2', *TINY, *RUN],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'CIFAR-10 already set up' in p.stdout  # setup_cifar10.sh ran and found the data
    report = json.load(open(out / 'results.json'))
    rows = report['rows']
    assert [r['checkpoint'] for r in rows] == [r.name for r in rels] + ['mean of 4']
    for rel, row in zip(rels, rows):
        test = [z for z in map(json.loads, open(out / rel.name / 'log.jsonl')) if z.get('type') == 'test_loss'][-1]
        assert row['n_images'] == test['n_images'] == 200
        assert row['measured_bpd'] == test['elbo_bpd'] and row['measured_bpd_se'] == test['elbo_bpd_se']
        assert row['published_bpd'] == rel.published_bpd
        assert row['diff_bpd'] == pytest.approx(test['elbo_bpd'] - float(rel.published_bpd))
        assert not row['within_noise']  # an untrained tiny model is far from the paper
        iw = json.load(open(out / rel.name / 'iwae-test-k2.json'))
        assert row['iw_bpd'] == iw['iw_nll_bits_per_dim'] and iw['n_images'] == 200 and iw['n_importance'] == 2
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith(rel.name + ' '))
        assert f"{test['elbo_bpd']:.4f} ± {test['elbo_bpd_se']:.4f} bits/dim (200 images) | published " \
               f"{rel.published_bpd} | difference {row['diff_bpd']:+.4f} | NOT within the noise" in line
        assert f"IW bound K=2: {iw['iw_nll_bits_per_dim']:.4f}" in line
    assert rows[0]['measured_bpd'] == rows[1]['measured_bpd'] != rows[2]['measured_bpd']  # same file, same noise
    assert rows[3]['overrides'] == {'enc_blocks': TINY_H['enc_blocks'].replace('1x2', '1x1')}
    assert f"--enc_blocks {TINY_H['enc_blocks'].replace('1x2', '1x1')}" in p.stdout
    mean = rows[4]
    assert mean['measured_bpd'] == pytest.approx(np.mean([r['measured_bpd'] for r in rows[:4]]))
    assert mean['published_bpd'] == '2.87'
    assert next(ln for ln in p.stdout.splitlines() if ln.startswith('mean of 4')).count('± <=') == 2
    md = open(out / 'results.md').read()
    assert '| checkpoint | test images | measured bits/dim (± SE) | published | difference | within noise |' in md
    assert f"| {rels[0].name} | 200 | {rows[0]['measured_bpd']:.4f} ± {rows[0]['measured_bpd_se']:.4f} | 2.879 |" in md
    assert report['device'].startswith('CPU') and report['n_importance'] == 2


def test_reproduce_refuses_flags_it_sets_itself(tmp_path):
    p = subprocess.run([sys.executable, 'reproduce.py', 'cifar10', '--restore_ema_path', 'x.th'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr == 'error: --restore_ema_path is set by reproduce.py itself; leave it out\n'


def test_launcher_prefix(monkeypatch):
    from reproduce import launch_command
    monkeypatch.delenv('LAUNCH', raising=False)
    assert launch_command('train.py', ['--test_eval']) == [sys.executable, 'train.py', '--test_eval']
    monkeypatch.setenv('LAUNCH', 'torchrun --nproc_per_node 8')  # torchrun takes the script itself
    assert launch_command('train.py', ['--x']) == ['torchrun', '--nproc_per_node', '8', 'train.py', '--x']
    monkeypatch.setenv('LAUNCH', 'mpiexec -n 8')
    assert launch_command('evaluate.py', []) == ['mpiexec', '-n', '8', sys.executable, 'evaluate.py']


def test_ffhq1024_data_needs_its_source(tmp_path):
    p = subprocess.run([sys.executable, 'reproduce.py', 'ffhq1024', '--data_root', str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count('\n') == 1
    assert "ffhq1024 needs FFHQ's images1024x1024 folder" in p.stderr and '--data_source' in p.stderr
    assert not os.listdir(tmp_path)
