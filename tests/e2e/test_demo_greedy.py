"""The built-in demo model end to end: greedy chat output equals transformers' greedy generation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.weights.resolve import demo_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Explain what a hash table is in two sentences.",
    "Translate 'good morning' into Spanish and German.",
]
N_TOKENS = 48


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference() -> Any:
    from transformers import AutoModelForCausalLM

    path = demo_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_greedy_matches_transformers(llm: LLM, reference: Any, prompt: str) -> None:
    messages = [{"role": "user", "content": prompt}]
    out = llm.chat(messages, SamplingParams(max_tokens=N_TOKENS, temperature=0.0))[0]
    ids = llm.apply_chat_template(messages)
    with torch.no_grad():
        gen = reference.generate(torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=N_TOKENS, do_sample=False,
                                 eos_token_id=llm.tokenizer.eos_token_id,
                                 pad_token_id=llm.tokenizer.eos_token_id)
    expected = gen[0, len(ids):].tolist()
    if expected and expected[-1] == llm.tokenizer.eos_token_id:
        expected = expected[:-1]
        assert out.finish_reason == "stop"
    else:
        assert out.finish_reason == "length"
        assert len(out.token_ids) == N_TOKENS
    assert out.token_ids == expected
    assert out.text == llm.tokenizer.decode(expected, skip_special_tokens=True)


def test_forward_logits_shape_and_dtype(llm: LLM) -> None:
    ids = llm.tokenizer("The quick brown fox").input_ids
    logits = llm.forward_logits(ids)
    assert logits.shape == (len(ids), llm.config.vocab_size)
    assert logits.dtype == torch.float32
