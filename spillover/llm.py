"""The `LLM` Python API: load a model, generate, chat, score."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from spillover.engine.engine import Engine, EngineConfig
from spillover.engine.outputs import TokenEvent
from spillover.engine.params import CompletionOutput, RequestOutput, SamplingParams
from spillover.engine.runner import CacheLayout, ModelRunner, SeqStep
from spillover.weights.resolve import load_config, load_tokenizer, resolve_model

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
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        num_state_slots: int | None = None,
        enable_prefix_caching: bool = True,
        max_prompt_checkpoints: int = 8,
        quant: str | None = None,
        quant_group_size: int = 128,
    ) -> None:
        from spillover.weights.build import load_for_llm

        self.source = resolve_model(model)
        self.config = load_config(self.source)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # quant: None keeps the checkpoint's dtype; int8 / int4 / fp8 quantize at load; "native" keeps a
        # GGUF file's own blocks packed. The record says which format each tensor got and why.
        self.model, self.quant_record = load_for_llm(
            self.source, self.config, self.device, self.dtype, quant, quant_group_size
        )
        self.max_model_len = min(max_model_len or self.config.max_position, self.config.max_position)
        self.block_size = block_size
        self.engine_config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            num_state_slots=num_state_slots,
            max_prompt_checkpoints=max_prompt_checkpoints,
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=self.max_model_len,
        )
        self._tokenizer: Any = None
        self._runner: ModelRunner | None = None  # scoring only (forward_logits); the engine has its own
        self._engine: Engine | None = None
        self._ids = itertools.count()

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

    def _has_tokenizer(self) -> bool:
        try:
            return self.tokenizer is not None
        except Exception:  # tiny test models ship without tokenizer files
            return False

    # ---- engine ------------------------------------------------------------------------------
    def make_engine(self, config: EngineConfig | None = None) -> Engine:
        """A new Engine over this model (the server's engine thread owns one)."""
        tokenizer = self.tokenizer if self._has_tokenizer() else None
        return Engine(self.model, self.config, tokenizer, self.device, self.dtype,
                      config or self.engine_config)

    @property
    def engine(self) -> Engine:
        """The batching engine (built on first use: it allocates the KV cache and state slots)."""
        if self._engine is None:
            self._engine = self.make_engine(self.engine_config)
        return self._engine

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
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs all prompts through the batching engine at once; outputs in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        encoded: list[tuple[list[int], str | None]] = []
        for p in prompts:
            if isinstance(p, str):
                encoded.append((self.tokenizer(p, add_special_tokens=False).input_ids, p))
            else:
                encoded.append((list(p), None))
        eng = self.engine
        ids = [f"llm-{next(self._ids)}" for _ in encoded]
        outputs: dict[str, RequestOutput] = {}
        try:
            for rid, (tok_ids, text), params in zip(ids, encoded, params_list, strict=True):
                eng.add_request(rid, tok_ids, params)
                outputs[rid] = RequestOutput(
                    request_id=rid, prompt=text, prompt_token_ids=tok_ids, finished=False,
                    outputs=[CompletionOutput(i, "", [], None, [] if params.logprobs is not None else None)
                             for i in range(params.n)],
                )
            open_count = sum(len(o.outputs) for o in outputs.values())
            while open_count:
                for ev in eng.step():
                    out = outputs.get(ev.request_id)
                    if out is None:
                        continue  # an event of a request this call did not add
                    if _absorb(out, ev):
                        open_count -= 1
        finally:
            for rid, out in outputs.items():
                if not all(c.finish_reason for c in out.outputs):
                    eng.abort(rid)  # interrupted (exception, KeyboardInterrupt): free its cache
        eos = self.eos_token_ids
        for out in outputs.values():
            out.finished = True
            for c in out.outputs:
                _strip_eos(c, eos)
        return [outputs[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(c, **(chat_template_kwargs or {})) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def stream_chat(
        self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None, **template_kw: Any
    ) -> Iterator[str]:
        """Text deltas of one chat completion (index 0) as the engine produces them."""
        ids = self.apply_chat_template(messages, **template_kw)
        eng = self.engine
        rid = f"llm-{next(self._ids)}"
        eng.add_request(rid, ids, sampling_params or SamplingParams())
        done = False
        try:
            while not done:
                for ev in eng.step():
                    if ev.request_id != rid or ev.index != 0:
                        continue
                    if ev.new_text:
                        yield ev.new_text
                    done = ev.finished
        finally:
            if not done:
                eng.abort(rid)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)


def _absorb(out: RequestOutput, ev: TokenEvent) -> bool:
    """Adds one event to its RequestOutput; True when it finished a completion."""
    c = out.outputs[ev.index]
    c.token_ids.extend(ev.new_token_ids)
    c.text += ev.new_text
    if c.logprobs is not None and ev.logprobs is not None:
        c.logprobs.extend(ev.logprobs)
    if ev.prompt_logprobs is not None:
        out.prompt_logprobs = ev.prompt_logprobs
    if ev.index == 0:
        out.num_cached_tokens = ev.num_cached_tokens
    if ev.finished:
        c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
    return ev.finished


def _strip_eos(c: CompletionOutput, eos: set[int]) -> None:
    # The end-of-sequence token ends the completion but is not part of it (stop_token_ids are).
    if c.finish_reason == "stop" and c.stop_reason is None and c.token_ids and c.token_ids[-1] in eos:
        c.token_ids.pop()
        if c.logprobs:
            c.logprobs.pop()
