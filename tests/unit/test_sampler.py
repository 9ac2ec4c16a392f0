from __future__ import annotations

import math

import torch

from spillover.engine.params import SamplingParams
from spillover.engine.request import Request
from spillover.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    prompt_logprobs,
)

V = 32


def make(rid: str, prompt: list[int] | None = None, output: list[int] | None = None,
         **kw: object) -> Request:
    r = Request(rid, prompt or [1, 2, 3], SamplingParams(**kw), eos_token_ids=(0,))  # type: ignore[arg-type]
    r.output_token_ids = list(output or [])
    return r


def sample(reqs: list[Request], logits: torch.Tensor) -> list[int]:
    return Sampler()(logits, SamplingBatch.from_requests(reqs)).token_ids.tolist()


def test_greedy_is_argmax_and_all_greedy_batch_skips_sampling() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    reqs = [make(f"g{i}", temperature=0.0) for i in range(3)] + [make("k1", top_k=1)]
    before = torch.random.get_rng_state()
    assert sample(reqs, logits) == logits.argmax(-1).tolist()
    assert torch.equal(before, torch.random.get_rng_state())  # no random draw at all


def test_seeded_rows_are_independent_of_the_batch() -> None:
    g = torch.Generator().manual_seed(1)
    row = torch.randn(V, generator=g)
    others = torch.randn(6, V, generator=g)

    def run(batch_rows: list[torch.Tensor], reqs: list[Request], steps: int = 20) -> list[int]:
        out = []
        for _ in range(steps):
            out.append(sample(reqs, torch.stack(batch_rows))[reqs.index(target)])
        return out

    target = make("t", seed=1234, temperature=0.9)
    alone = run([row], [target])
    target = make("t", seed=1234, temperature=0.9)
    crowd = [make("a", temperature=1.0), make("b", seed=7), make("c", temperature=0.0)]
    mixed = run([others[0], others[1], row, others[2]], [crowd[0], crowd[1], target, crowd[2]])
    assert alone == mixed
    assert len(set(alone)) > 1  # it really samples
    target = make("t", seed=99, temperature=0.9)
    assert run([row], [target]) != alone


def reference_penalties(
    logits: torch.Tensor, prompt: list[int], output: list[int], pres: float, freq: float, rep: float
) -> torch.Tensor:
    out = logits.clone()
    for t in range(out.shape[0]):
        if t in prompt or t in output:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        out[t] -= freq * output.count(t)
        if t in output:
            out[t] -= pres
    return out


def test_penalties_match_reference() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g) * 3
    prompts = [[1, 2, 2, 5], [7], [3, 3]]
    outputs = [[2, 9, 9, 9, 4], [], [3, 30, 30]]
    params = [(0.5, 0.3, 1.3), (1.0, -0.5, 0.8), (0.0, 0.0, 1.0)]
    got = apply_penalties(
        logits, prompts, outputs, [p[0] for p in params], [p[1] for p in params],
        [p[2] for p in params]
    )
    for i in range(3):
        want = reference_penalties(logits[i], prompts[i], outputs[i], *params[i])
        torch.testing.assert_close(got[i], want)
    assert torch.equal(got[2], logits[2])  # row without penalties untouched


def test_top_k_top_p_min_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1],
                                     [0.05, 0.5, 0.25, 0.2]]))
    out = apply_top_k_top_p(logits, [2, 0, 0], [1.0, 0.65, 0.7])
    kept = torch.isfinite(out).tolist()
    assert kept[0] == [True, True, False, False]  # top_k = 2
    assert kept[1] == [True, True, False, False]  # 0.4 falls short of 0.65, 0.4 + 0.3 reaches it
    assert kept[2] == [False, True, True, False]  # 0.5 + 0.25 reaches 0.7
    torch.testing.assert_close(out[0, :2], logits[0, :2])
    both = apply_top_k_top_p(logits[:1], [3], [0.6])  # top-k first, then p over the survivors
    assert torch.isfinite(both).tolist() == [[True, True, False, False]]
    mp = apply_min_p(logits, torch.tensor([0.6, 0.0, 0.45]))
    assert torch.isfinite(mp).tolist() == [
        [True, True, False, False],  # 0.2 < 0.6 * 0.4
        [True, True, True, True],
        [False, True, True, False],  # 0.2 < 0.45 * 0.5 = 0.225
    ]


def test_sampling_follows_the_filtered_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = torch.log(probs).expand(n, 4).clone()
    torch.manual_seed(0)
    reqs = [make(f"r{i}", top_k=3) for i in range(n)]
    counts = torch.bincount(torch.tensor(sample(reqs, logits)), minlength=4).float() / n
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert counts[3] == 0
    assert (counts - expected).abs().max() < 0.03


def test_logit_bias_and_min_tokens_ban() -> None:
    logits = torch.zeros(3, V)
    logits[:, 0] = 5.0  # eos is the favourite
    reqs = [
        make("bias", temperature=0.0, logit_bias={7: 10.0}),
        make("min", temperature=0.0, min_tokens=2, output=[4], stop_token_ids=[1]),
        make("done", temperature=0.0, min_tokens=1, output=[4]),
    ]
    logits[1, 1] = 4.0  # the stop id is second: banned too
    assert sample(reqs, logits) == [7, 2, 0]


def test_logprobs_are_raw_and_include_the_sampled_token() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, V, generator=g)
    reqs = [
        make("a", temperature=0.0, logprobs=3, presence_penalty=2.0,
             output=[int(logits[0].argmax())]),
        make("b"),
    ]
    out = Sampler()(logits, SamplingBatch.from_requests(reqs))
    dicts = out.logprob_dicts([3, None])
    assert dicts[1] is None and dicts[0] is not None
    raw = torch.log_softmax(logits[0], -1)
    chosen = int(out.token_ids[0])
    assert chosen != int(logits[0].argmax())  # the penalty moved the choice...
    assert math.isclose(dicts[0][chosen], float(raw[chosen]), rel_tol=1e-6)  # ...not the logprob
    top3 = raw.topk(3).indices.tolist()
    assert set(dicts[0]) == set(top3) | {chosen}


def test_prompt_logprobs() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=g)
    targets = [5, 6, 7]
    got = prompt_logprobs(logits, targets, 2)
    lp = torch.log_softmax(logits, -1)
    for i, t in enumerate(targets):
        assert math.isclose(got[i][t], float(lp[i, t]), rel_tol=1e-6)
        assert set(lp[i].topk(2).indices.tolist()) <= set(got[i])
        assert len(got[i]) <= 3
