"""Shared fixtures: the tiny preset, its processor, and batches built from the synthetic data."""

import pytest
import torch

from configuration_vsm import VSMConfig


@pytest.fixture(scope="session")
def tiny_processor():
    from processing_vsm import VSMProcessor

    return VSMProcessor.from_preset("tiny")


@pytest.fixture(scope="session")
def synthetic_rows():
    """A few rows of every query type from the built-in data, keyed by query type."""
    from modeling_vsm.data import load_synthetic

    rows = {}
    for row in load_synthetic("test", num_samples=120):
        rows.setdefault(row["query_type"], []).append(row)
    return rows


def make_tiny_model(seed: int = 0, **overrides):
    from modeling_vsm import VSMForCausalLM

    torch.manual_seed(seed)
    return VSMForCausalLM(VSMConfig.from_preset("tiny", **overrides))


def make_batch(processor, rows):
    from modeling_vsm.training import VSMDataCollator

    return VSMDataCollator(processor)(rows)
