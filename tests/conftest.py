"""Shared test fixtures. No test touches the network.

Real face photos come from ../shared/data/faces and real model weights from
../shared/models (via $VEIL_MODELS); tests that need them skip cleanly when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FACES_DIR = SHARED / "data" / "faces"
MODELS_DIR = SHARED / "models"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
if MODELS_DIR.is_dir():
    os.environ.setdefault("VEIL_MODELS", str(MODELS_DIR))


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not FACES_DIR.is_dir():
        pytest.skip(f"real face photos not found at {FACES_DIR}")
    return FACES_DIR


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not MODELS_DIR.is_dir():
        pytest.skip(f"model weights not found at {MODELS_DIR}")
    return MODELS_DIR


@pytest.fixture(scope="session")
def int8_centerface() -> Path:
    """The int8 CenterFace derived from the installed float model into the user cache (as a
    default run does; derived once per machine)."""
    from veil.transforms.models import ModelNotFoundError, ModelRegistry
    from veil.transforms.quantize import centerface_int8

    registry = ModelRegistry(models_dir=None)
    try:
        source = registry.resolve("centerface")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return centerface_int8(source, registry.cache_dir)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded 2-CPU Ray for the whole session (ray.init costs ~5 s)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
