"""The `LLM` Python API: load a model, generate, chat, score."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from spillover.config import ModelConfig
from spillover.engine.batch import StepPlan
from spillover.engine.engine import Engine, EngineConfig
from spillover.engine.outputs import TokenEvent
from spillover.engine.params import CompletionOutput, RequestOutput, SamplingParams
from spillover.engine.runner import CacheLayout, ModelRunner
from spillover.hw.info import HardwareInfo
from spillover.models.causal_lm import CausalLM
from spillover.offload.budget import MemoryBudgets, cap_allocator, plan_experts
from spillover.offload.placement import ExpertPlacement, place_experts
from spillover.offload.residency import ExpertStats, ResidencyMap
from spillover.plan.engine_cache import resolve_max_model_len
from spillover.plan.hub import is_hub_id
from spillover.plan.memory import KV_CACHE, MemoryPlan
from spillover.weights.hub import HubOptions
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


def _hub_hardware(model: str | None, device: torch.device,
                  budgets: MemoryBudgets) -> HardwareInfo | None:
    """This machine within the budgets, for a hub id's fit check (probing costs nothing
    otherwise)."""
    if model is None or not is_hub_id(model):
        return None
    from spillover.hw.probe import probe
    from spillover.offload.budget import budget_hardware

    return budget_hardware(probe(), device, budgets)


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
        quant: str | None = "auto",
        quant_group_size: int = 128,
        gpu_memory: str | int | float | None = None,
        cpu_memory: str | int | float | None = None,
        experts: ExpertPlacement | None = None,
        expert_policy: str = "lrfu",
        expert_stats: str | None = None,
        expert_misses: str = "auto",
        revision: str | None = None,
        gguf_file: str | None = None,
        enforce_eager: bool = False,
    ) -> None:
        from spillover.weights.build import load_for_llm

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.budgets = MemoryBudgets.parse(gpu_memory, cpu_memory, self.device)
        # A hub id (Org/Name) is planned for this device and budgets before anything is
        # downloaded: a model that cannot fit is refused with what would make it fit.
        self.source = resolve_model(model, HubOptions(
            revision=revision, gguf_file=gguf_file, quant=quant,
            hardware=_hub_hardware(model, self.device, self.budgets), context=max_model_len,
            tiered=experts is not None or self.budgets.given))
        self.config = load_config(self.source)
        # quant: one of spillover.quant.QUANT_CHOICES (legacy spellings via normalize_quant):
        # auto keeps the checkpoint's formats; int8 / int4 / fp8 / int4-experts quantize at load;
        # "native" keeps a GGUF file's own blocks packed. The record says which format each tensor
        # got and why.
        # Budgets (gpu_memory / cpu_memory: "32GiB", "60GB", a fraction, or bytes) or an explicit
        # placement tier the MoE experts: the model is loaded on the CPU, the placement keeps each
        # layer's slot experts on the device, its host experts in RAM and spills the rest to disk.
        tiered = experts is not None or (self.budgets.given and self.config.num_experts > 0)
        load_device = torch.device("cpu") if tiered else self.device
        self.model, self.quant_record = load_for_llm(
            self.source, self.config, load_device, self.dtype, quant, quant_group_size
        )
        self.model = self._tier_experts(
            tiered, experts, expert_policy, expert_misses, expert_stats,
            max_num_seqs=max_num_seqs, token_budget=max_num_batched_tokens, context=max_model_len)
        if kv_cache_memory_bytes is None and self.placement_plan is not None:
            planned = self.placement_plan.tiers.get(self._cache_tier, {})
            kv_cache_memory_bytes = planned.get(KV_CACHE)
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
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
        )
        self._tokenizer: Any = None
        # scoring only (forward_logits); the engine has its own
        self._runner: ModelRunner | None = None
        self._engine: Engine | None = None
        self._ids = itertools.count()

    @property
    def _cache_tier(self) -> str:
        return "gpu" if self.device.type == "cuda" else "host"

    def _tier_experts(self, tiered: bool, experts: ExpertPlacement | None, policy: str,
                      misses: str, stats_file: str | None, **limits: Any) -> CausalLM:
        """Place the MoE experts over the tiers (the model is on the CPU when `tiered`), then move
        the rest of the model to the device. The placement comes from an explicit `experts`, or
        from the planner's MemoryPlan for the budgets."""
        from spillover.weights.build import move_model

        self.residency: ResidencyMap | None = None
        self.placement_plan: MemoryPlan | None = None
        if not tiered:
            self.model.fuse_shared_experts()
            return self.model
        if experts is None:
            self.placement_plan, experts = plan_experts(
                self.config, self.model, self.device, self.budgets, policy=policy,
                miss_mode=misses, **limits)
            cap_allocator(self.device, self.placement_plan)
        stats = ExpertStats.load(stats_file) if stats_file else None
        self.residency = place_experts(self.model, experts, self.device, stats)
        model = move_model(self.model, self.device)
        model.fuse_shared_experts()  # into the slots, where misses are mapped
        return model

    @classmethod
    def from_model(cls, model: CausalLM, config: ModelConfig, device: str | torch.device = "auto",
                   dtype: str | torch.dtype = "auto", tokenizer: Any = None, *,
                   gpu_memory: str | int | float | None = None,
                   cpu_memory: str | int | float | None = None,
                   experts: ExpertPlacement | None = None, expert_policy: str = "lrfu",
                   expert_misses: str = "auto", **engine_kwargs: Any) -> LLM:
        """An LLM around a model already in memory (spillover.bench.synthetic builds one): nothing
        is loaded, the model stays where it is, and without `tokenizer` requests pass token ids.
        `engine_kwargs` are EngineConfig fields (max_num_seqs, max_model_len, ...)."""
        llm = cls.__new__(cls)
        llm.source = None  # type: ignore[assignment]  # no files: nothing to load a tokenizer from
        llm.config = config
        llm.device = device if isinstance(device, torch.device) else resolve_device(device)
        llm.dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, llm.device)
        llm.budgets = MemoryBudgets.parse(gpu_memory, cpu_memory, llm.device)
        llm.model, llm.quant_record = model, {}
        tiered = experts is not None or (llm.budgets.given and config.num_experts > 0)
        llm.model = llm._tier_experts(
            tiered, experts, expert_policy, expert_misses, None,
            max_num_seqs=engine_kwargs.get("max_num_seqs", 16),
            token_budget=engine_kwargs.get("max_num_batched_tokens", 2048),
            context=engine_kwargs.get("max_model_len"))
        if llm.placement_plan is not None and engine_kwargs.get("kv_cache_memory_bytes") is None:
            engine_kwargs["kv_cache_memory_bytes"] = llm.placement_plan.tiers.get(
                llm._cache_tier, {}).get(KV_CACHE)
        llm.engine_config = EngineConfig(**engine_kwargs)
        llm.block_size = llm.engine_config.block_size
        llm._tokenizer = tokenizer
        llm._runner = None
        llm._engine = None
        llm._ids = itertools.count()
        return llm

    @property
    def max_model_len(self) -> int:
        """The longest sequence this model serves (resolve_max_model_len of the engine config)."""
        return resolve_max_model_len(self.config, self.engine_config.max_model_len)

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
            layout = CacheLayout(blocks, self.block_size, 1)
            self._runner = ModelRunner(self.model, layout, self.device, self.dtype)
        return self._runner

    # ---- scoring -----------------------------------------------------------------------------
    def forward_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position, float32 [len, vocab], computed in one prefill."""
        if not token_ids:
            raise ValueError("token_ids is empty")
        runner = self._runner_for(len(token_ids))
        blocks = list(range(runner.layout.num_blocks))
        plan = StepPlan.one_sequence(list(token_ids), blocks, self.block_size)
        return runner.execute(plan).logits.cpu()

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
                    outputs=[CompletionOutput(i, "", [], None,
                                              [] if params.logprobs is not None else None)
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
        kw = chat_template_kwargs or {}
        prompts = [self.apply_chat_template(c, **kw) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def stream_chat(
        self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
        **template_kw: Any
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
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, **kw)
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
    stopped = c.finish_reason == "stop" and c.stop_reason is None
    if stopped and c.token_ids and c.token_ids[-1] in eos:
        c.token_ids.pop()
        if c.logprobs:
            c.logprobs.pop()
