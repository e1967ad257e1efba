"""veRL 0.9.1 with TRL installed: the value-head patch that breaks veRL's engine build, and our shim.

veRL's FSDP engine calls ``apply_monkey_patch`` on every model it builds; with TRL importable it
imports ``AutoModelForCausalLMWithValueHead``, which TRL 1.16 no longer has. The worker tests
(test_verl_worker.py) build veRL's actor with TRL installed; this file shows the failure without
the shim and that the shim changes nothing else.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainers
pytest.importorskip("verl")
pytest.importorskip("trl")

from stable_async.integrations import verl_trl_shim  # noqa: E402


@pytest.fixture
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def test_verl_monkey_patch_fails_with_trl_installed_unless_the_shim_is_in(tiny_qwen2, monkeypatch):
    import verl  # noqa: F401  (the plugin installs the shim)
    from verl.models.transformers import monkey_patch

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    assert verl_trl_shim.trl_installed() and verl_trl_shim.value_head_class() is None  # TRL 1.16
    assert verl_trl_shim.installed()
    try:
        verl_trl_shim.uninstall()
        with pytest.raises(ImportError, match="AutoModelForCausalLMWithValueHead"):
            monkey_patch.apply_monkey_patch(tiny_qwen2, use_remove_padding=True)
    finally:
        verl_trl_shim.install()
    monkey_patch.apply_monkey_patch(tiny_qwen2, use_remove_padding=True)  # the same call, shim in: builds


def test_the_shim_only_answers_for_the_value_head_patch():
    from verl.models.transformers import monkey_patch
    from verl.utils import import_utils

    assert monkey_patch.is_trl_available is verl_trl_shim.value_head_patch_applies
    assert import_utils.is_trl_available()  # veRL's own answer elsewhere is unchanged
    assert verl_trl_shim.value_head_patch_applies() is False
