"""The README.md of a deployment: what was chosen and why, the bill, the placement, the speed."""

from __future__ import annotations

from spillover.deploy.choose import ENGINE_NAME, Deployment
from spillover.deploy.compose import API_KEY_ENV, HF_TOKEN_ENV
from spillover.deploy.engines import PORT, RAY_PORT, SGLANG_DIST_PORT
from spillover.hw.info import fmt_bytes
from spillover.plan.memory import MemoryPlan

TIERS = {"gpu": "GPU", "host": "pinned RAM", "disk": "disk"}


def render(d: Deployment) -> str:
    name = ENGINE_NAME[d.engine]
    out = [f"# {d.served_name} with {name}", ""]
    out += [f"Written by `spillover deploy` for {d.gpus} x {d.gpu_name}"
            + (f" on each of {d.nodes} nodes" if d.nodes > 1 else "")
            + f", {fmt_bytes(d.plan.hardware.ram_total)} RAM; image `{d.image}`.", ""]
    out += ["## Why this engine", ""] + [f"- {w}" for w in d.why] + [""]
    out += _bill(d.plan) + _placement(d) + _speed(d) + _run(d)
    out += ["## The server command", "", "```", _shell(d.command.argv), "```", ""]
    return "\n".join(out)


def _bill(plan: MemoryPlan) -> list[str]:
    ctx = plan.extra.get("context", plan.limits.context)
    out = ["## The bill (one copy of the model)", "",
           f"{plan.params_total / 1e9:.1f}B parameters, {plan.params_active_per_token / 1e9:.1f}B "
           f"active per token; {plan.scheme.name} ({plan.scheme.description}).", "",
           "| component | bytes |", "| --- | ---: |"]
    out += [f"| {c} | {fmt_bytes(b)} |" for c, b in plan.weights_bytes.items() if b]
    out += [f"| **weights** | **{fmt_bytes(plan.weights_total)}** |",
            f"| KV cache per token | {plan.kv_bytes_per_token:,} B |"]
    if plan.state_bytes_per_sequence:
        out.append(f"| linear-attention state per sequence | "
                   f"{fmt_bytes(plan.state_bytes_per_sequence)} |")
    out += [f"| activations ({plan.limits.token_budget} tokens a pass) | "
            f"{fmt_bytes(plan.activation_bytes)} |",
            f"| CUDA runtime per GPU | {fmt_bytes(plan.runtime_bytes)} |", "",
            f"Context {ctx} tokens x {plan.limits.seqs} sequence(s). Same numbers as "
            f"`{_plan_command(plan)}`.", ""]
    return out


def _plan_command(plan: MemoryPlan) -> str:
    """The `spillover plan` line that reproduces this plan's numbers exactly."""
    hw, lim = plan.hardware, plan.limits
    gpu = f"--gpu '{hw.gpu.name}' --vram {hw.gpu.vram_total}B " if hw.gpu else "--no-gpu "
    return (f"spillover plan {plan.model} {gpu}--ram {hw.ram_total}B --quant {plan.scheme.name} "
            f"--context {plan.extra.get('context', lim.context)} --seqs {lim.seqs} "
            f"--token-budget {lim.token_budget}")


def _placement(d: Deployment) -> list[str]:
    out = ["## Placement", ""]
    par = d.parallel
    if par is None:
        p = d.plan
        out += ["| | " + " | ".join(TIERS.values()) + " |", "| --- | ---: | ---: | ---: |"]
        out.append("| total | " + " | ".join(fmt_bytes(p.tier_total(t)) for t in TIERS) + " |")
        if p.num_experts:
            out.append(f"\nExperts per MoE layer: {p.expert_slots_per_layer} in GPU slots, "
                       f"{p.host_experts_per_layer} in pinned RAM, of {p.num_experts}.")
        out += ["", f"Budgets passed to `spillover serve`: --gpu-memory "
                f"{fmt_bytes(p.hardware.gpu.vram_total) if p.hardware.gpu else '-'} (GPU "
                f"budget after the CUDA runtime: {fmt_bytes(p.gpu_budget)}), --cpu-memory "
                f"{fmt_bytes(p.hardware.ram_total)} (usable for weights: "
                f"{fmt_bytes(p.host_budget)}). The server re-plans from these totals and "
                "allocates the same numbers.", ""]
        return out
    b = par.bill
    split = f"tensor parallel {par.tp}" + (f", pipeline parallel {par.pp}" if par.pp > 1 else "")
    out += [f"{split}" + (", expert parallel" if par.expert_parallel else "")
            + (f", {par.dp} data-parallel replicas" if par.dp > 1 else "")
            + f"; each GPU may use {par.memory_fraction:.2f} of its memory:", "",
            "| per GPU | bytes |", "| --- | ---: |",
            f"| weights | {fmt_bytes(b.weights)} |",
            f"| activations | {fmt_bytes(b.activations)} |",
            f"| CUDA runtime | {fmt_bytes(b.runtime)} |",
            f"| room for the KV cache | {fmt_bytes(par.kv_room)} |",
            f"| KV per token | {b.kv_bytes_per_token:,} B |", "",
            f"Longest context: {par.max_context:,} tokens (the model's maximum is "
            f"{d.plan.config.max_position:,}); the engine measures its own peak at start-up and "
            "refuses to start if this does not fit.", ""]
    if d.quantization:
        out += [f"--quantization {d.quantization} (matches the checkpoint / the plan's format).",
                ""]
    return out


def _speed(d: Deployment) -> list[str]:
    out = ["## Predicted speed (batch 1)", ""]
    if d.parallel is None:
        pr = d.plan.predicted
        out += [f"- decode ~{pr.decode_tok_s:.0f} tok/s, prefill ~{pr.prefill_tok_s:.0f} tok/s",
                "- time per decode token by link: "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in pr.decode_ms_by_link.items())]
    else:
        out += [f"- decode ~{d.parallel.decode_tok_s:.0f} tok/s: the spillover byte model per GPU "
                "plus two all-reduces per layer (an assumed 15 us each); the engine's own kernels "
                "decide the real figure"]
    return out + ["", "Predictions, not measurements: `spillover bench` measures.", ""]


def _run(d: Deployment) -> list[str]:
    out = ["## Run", "",
           "Needs Docker with the NVIDIA Container Toolkit. Secrets come from your environment "
           "(compose secrets), never from a file; compose wants both variables set, empty if "
           "unused:", "", "```sh",
           f"export {API_KEY_ENV}=...   # clients send it as `Authorization: Bearer ...`",
           f"export {HF_TOKEN_ENV}=...   # empty for a public model"]
    if d.engine == "spillover":
        out.append("docker build -t spillover:0.1.0 /path/to/spillover   # the image, once")
    if d.nodes > 1 and d.engine == "vllm":
        out += ["export HEAD_ADDR=10.0.0.1   # the first node, on every node",
                "docker compose --profile head up -d     # on the first node",
                "docker compose --profile worker up -d   # on each other node"]
        out += ["```", "", f"Ray listens on {RAY_PORT} of the first node; the nodes must reach "
                "each other on the cluster network (compose uses host networking).", ""]
    elif d.nodes > 1:
        out += ["export HEAD_ADDR=10.0.0.1 NODE_RANK=0   # 1 .. N-1 on the other nodes",
                "docker compose up -d                    # on every node"]
        out += ["```", "", f"Node 0 hosts the rendezvous on port {SGLANG_DIST_PORT} and the API; "
                "compose uses host networking.", ""]
    else:
        out += ["docker compose up -d", f"curl -s localhost:{PORT}/health", "```", "",
                f"The API is published on 127.0.0.1:{PORT} (BIND_ADDR and PORT change that).", ""]
    return out


def _shell(argv: tuple[str, ...]) -> str:
    """One flag and its value a line."""
    lines: list[str] = []
    for a in argv:
        if a.startswith("--") or not lines or not lines[-1].startswith("--"):
            lines.append(a)
        else:
            lines[-1] += f" {a}"
    head = [x for x in lines if not x.startswith("--")]
    flags = [x for x in lines if x.startswith("--")]
    return " \\\n  ".join([" ".join(head), *flags])
