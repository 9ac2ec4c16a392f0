"""The `LLM` Python API: load a model, generate, chat, score."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from spillover.engine.runner import CacheLayout, ModelRunner, SeqStep
from spillover.engine.sampling import CompletionOutput, RequestOutput, SamplingParams
from spillover.models.registry import load_config, load_model, load_tokenizer, resolve_model

log = logging.getLogger("spillover.llm")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r} (auto, cpu or cuda)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return table[dtype]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        block_size: int = 16,
        max_model_len: int | None = None,
    ) -> None:
        self.source = resolve_model(model)
        self.config = load_config(self.source)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_model(self.source, self.config, self.device, self.dtype)
        self.max_model_len = min(max_model_len or self.config.max_position, self.config.max_position)
        self.block_size = block_size
        self._tokenizer: Any = None
        self._runner: ModelRunner | None = None

    # ---- tokenizer ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        tok = self._tokenizer if self._tokenizer is not None else None
        if tok is not None and tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        return ids

    def _runner_for(self, max_tokens: int) -> ModelRunner:
        blocks = -(-max_tokens // self.block_size)
        if self._runner is None or self._runner.layout.num_blocks < blocks:
            self._runner = ModelRunner(self.model, CacheLayout(blocks, self.block_size, 1), self.device, self.dtype)
        return self._runner

    # ---- scoring -----------------------------------------------------------------------------
    def forward_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position, float32 [len, vocab], computed in one prefill."""
        if not token_ids:
            raise ValueError("token_ids is empty")
        runner = self._runner_for(len(token_ids))
        step = SeqStep(list(token_ids), 0, list(range(runner.layout.num_blocks)), 0)
        return runner.run([step], all_logits=True).cpu()

    # ---- generation --------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str] | Sequence[list[int]] | str,
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        outs = []
        for p in prompts:
            if isinstance(p, str):
                ids = self.tokenizer(p, add_special_tokens=False).input_ids
                text: str | None = p
            else:
                ids, text = list(p), None
            outs.append(self._generate_one(ids, text, params))
        return outs

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(c, **(chat_template_kwargs or {})) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def _generate_one(self, ids: list[int], text: str | None, params: SamplingParams) -> RequestOutput:
        if not ids:
            raise ValueError("prompt is empty")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens")
        runner = self._runner_for(total)
        table = list(range(runner.layout.num_blocks))
        gen = torch.Generator(device="cpu")
        if params.seed is not None:
            gen.manual_seed(params.seed)
        eos = set() if params.ignore_eos else self.eos_token_ids
        out: list[int] = []
        finish = "length"
        step = SeqStep(ids, 0, table, 0)
        detok = ""
        while len(out) < params.max_tokens:
            logits = runner.run([step])[0]
            tok = _simple_sample(logits, params, gen)
            out.append(tok)
            if len(out) >= params.min_tokens and (tok in eos or tok in params.stop_token_ids):
                finish = "stop"
                if tok in eos:
                    out.pop()
                break
            if params.stop and self._tokenizer is not None:
                detok = self.tokenizer.decode(out, skip_special_tokens=True)
                hit = min((detok.find(s) for s in params.stop if s in detok), default=-1)
                if hit >= 0:
                    finish = "stop"
                    detok = detok[:hit]
                    break
            step = SeqStep([tok], step.num_cached + len(step.token_ids), table, 0)
        if finish == "stop" and params.stop and detok:
            out_text = detok
        else:
            out_text = self.tokenizer.decode(out, skip_special_tokens=True) if self._has_tokenizer() else ""
        return RequestOutput(
            request_id=uuid.uuid4().hex, prompt=text, prompt_token_ids=ids,
            outputs=[CompletionOutput(0, out_text, out, finish)],
        )

    def _has_tokenizer(self) -> bool:
        try:
            return self.tokenizer is not None
        except Exception:  # tiny test models ship without tokenizer files
            return False


def _simple_sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    if p.greedy:
        return int(torch.argmax(logits).item())
    x = logits.float().cpu() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = sp.cumsum(0) - sp < p.top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=gen).item())
