"""Shared test setup: one torch thread (2-core machines slow down up to 80x with two busy threads),
tiny diffusers models built from configs (never a hub download), and the gpu marker."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_class_unet(sample_size: int = 8, num_classes: int = 10, prediction_type: str = "v_prediction"):
    """A class-conditional UNet2DModel small enough for CPU tests (null label = num_classes)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=num_classes + 1).eval()


@pytest.fixture
def tiny_teacher_dir(tmp_path_factory):
    """A tiny class-conditional teacher saved as a diffusers directory (unet/ + scheduler/)."""
    from diffusers import DDIMScheduler

    d = tmp_path_factory.mktemp("teacher")
    tiny_class_unet().save_pretrained(d / "unet")
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                  set_alpha_to_one=False, timestep_spacing="trailing").save_pretrained(d / "scheduler")
    return d


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """family -> the tiny stock pipeline of ``tiny_models`` saved as a diffusers folder (built once per module)."""
    import tiny_models

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tmp_path_factory.mktemp(f"teacher_{family}")
            tiny_models.FAMILIES[family]().save_pretrained(cache[family])
        return cache[family]
    return get


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a run (a bf16 preset) may change it, so each module leaves it as
    it found it."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
