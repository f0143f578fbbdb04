"""Where the tests run the model: the CPU unless ``LFM2AUDIO_TEST_DEVICE`` says otherwise.

``LFM2AUDIO_TEST_DEVICE=cuda python -m pytest tests -k "not web"`` runs the model, engine and server
tests on a GPU (float32, as the golden data was made), so whoever has one checks everything there.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("LFM2AUDIO_TEST_DEVICE", "cpu"))
DTYPE = torch.float32  # the golden data's precision, on any device
