"""Shared test fixtures: the release's reference data (tests/reference/, see its README), tiny models."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference')  # see reference/README.md


def ref(*parts):
    return os.path.join(REF, *parts)


def load_tiny(name='tiny32'):
    """The reference tiny model (eval mode) with its H and preprocessed batch."""
    from hps import Hyperparams
    from vae import VAE
    cfg = json.load(open(ref(name, 'config.json')))
    H = Hyperparams(cfg['H'], cuda_graphs=False)  # the release's H lacks this repository's speed flags
    model = VAE(H)
    model.load_state_dict(torch.load(ref(name, 'model.th'), weights_only=True))
    model.eval()
    b = np.load(ref(name, 'batch_preprocessed.npz'))
    return H, model, torch.tensor(b['x_in']), torch.tensor(b['x_target']), cfg


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


class FakeCUDAGraphs:
    """torch.cuda's stream and graph API played on the CPU, so that train_step.GraphedStep runs its
    eager warm-up, its capture and its replays there.  A capture runs its body once, eagerly,
    and notes the capture mode and the function GraphedStep captured (its ``_step``); a replay
    runs that function again and copies the results into the captured outputs, as a CUDA graph
    writes them to the same memory on every replay.  ``captures`` lists the capture modes,
    ``captured_batches`` what the static batch buffer held when each capture ran, ``replays``
    counts replays, ``eager`` the steps run on a side stream."""

    def __init__(self, monkeypatch):
        import train_step
        self.captures, self.captured_batches, self.replays, self.eager, self._capturing = [], [], 0, 0, None
        fakes = self
        step = train_step.GraphedStep._step

        def recorded_step(graphed):
            stats = step(graphed)
            if fakes._capturing is not None:
                fakes._capturing.body, fakes._capturing.outputs = (lambda: step(graphed)), stats
                fakes.captured_batches.append(graphed.x.clone())
            else:
                fakes.eager += 1
            return stats

        class Graph:
            replayed = 0

            def replay(self):
                fakes.replays += 1
                self.replayed += 1
                if self.replayed > 1:  # the capture ran its body once already: that was the first replay's work
                    for k, v in self.body().items():
                        self.outputs[k].copy_(v)

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode='global'):
            self.captures.append(capture_error_mode)
            self._capturing = cuda_graph
            try:
                yield
            finally:
                self._capturing = None

        class Stream:
            def wait_stream(self, other):
                pass

        monkeypatch.setattr(train_step.GraphedStep, '_step', recorded_step)
        monkeypatch.setattr(torch.cuda, 'CUDAGraph', Graph)
        monkeypatch.setattr(torch.cuda, 'graph', graph)
        monkeypatch.setattr(torch.cuda, 'Stream', Stream)
        monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, 'stream', lambda s: contextlib.nullcontext())


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    return FakeCUDAGraphs(monkeypatch)
