"""Shared fixtures: tiny captions, a random-init embedded generator, and tiny shard folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TEST_THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A stage run in-process with num_threads=1 sets torch's thread count for the whole process; without this,
    every later test ran on one thread (the world generator test took 413 s in the suite, 194 s alone)."""
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def captions_file(tmp_path_factory):
    from synrep.captions.stage import CaptionsConfig, run_captions

    out = tmp_path_factory.mktemp("captions")
    return run_captions(CaptionsConfig(out_dir=str(out), per_concept=4, dedup="text"))


@pytest.fixture(scope="session")
def random_generator_dir(tmp_path_factory):
    """A randomly initialised embedded generator saved like the shipped one."""
    from synrep.embedded_t2i.model import EmbeddedGenerator, EmbeddedModelConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("generator")
    EmbeddedGenerator(EmbeddedModelConfig(block_out_channels=[8, 16, 16], attention_head_dim=4, norm_num_groups=4)).save(folder)
    return folder


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, captions_file, random_generator_dir):
    """40 caption groups x 4 images (28x28x1) in 4 shards."""
    from synrep.generate.stage import GenerateConfig, run_generate

    out = tmp_path_factory.mktemp("shards")
    run_generate(GenerateConfig(captions=str(captions_file), out_dir=str(out), generator=f"embedded:{random_generator_dir}",
                                steps=2, captions_per_shard=10, batch_captions=10, preview=False))
    return out


@pytest.fixture(scope="session")
def fashion_mnist_available():
    from synrep.datasets import DatasetError, fashion_mnist_dir

    try:
        fashion_mnist_dir()
        return True
    except DatasetError:
        return False
