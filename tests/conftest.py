"""Shared test fixtures: the release's reference data (tests/reference/, see its README), tiny models."""
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
    H = Hyperparams(cfg['H'])
    model = VAE(H)
    model.load_state_dict(torch.load(ref(name, 'model.th'), weights_only=True))
    model.eval()
    b = np.load(ref(name, 'batch_preprocessed.npz'))
    return H, model, torch.tensor(b['x_in']), torch.tensor(b['x_target']), cfg


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
