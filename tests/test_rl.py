"""RL: losses and advantages against hand-computed numbers, masks, KL at step 0, learning on a toy
reward (grpo and reinforce), rewards registry, resume and the CLI."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_rl_batch, run_cli
from posttrain.engine.base import Completion
from posttrain.errors import PosttrainError
from posttrain.losses.policy import (
    SPLIT_INVARIANT,
    StepSize,
    batch_mean_baseline,
    group_normalized,
    kl_k1,
    kl_k3,
    leave_one_out,
    policy_loss,
    token_logprobs,
)
from posttrain.tasks.rewards import REWARDS, compute_rewards, parse_reward
from posttrain.trainers.rl import Batch, RLConfig, sequence_tensors, train

TOY = '''
def low_ids(prompts, completions, answer, completion_ids, **kw):
    return [sum(t < 96 for t in ids) / max(1, len(ids)) for ids in completion_ids]

def boom(prompts, completions, answer, **kw):
    raise ValueError("nope")

def short(prompts, completions, answer, **kw):
    return [1.0]

def const(prompts, completions, answer, **kw):
    return [1.0] * len(completions)

def nan_reward(prompts, completions, answer, **kw):
    return [float("nan")] * len(completions)

def half_const(prompts, completions, answer, completion_ids, **kw):
    # prompts of even length: one reward for the whole group (no signal); others: varies by sample
    return [1.0 if len(p) % 2 == 0 else float(ids[0] % 2) for p, ids in zip(prompts, completion_ids)]
'''


@pytest.fixture()
def toy_file(tmp_path):
    f = tmp_path / "toy.py"
    f.write_text(TOY)
    return f


# -------------------------------------------------------------------------------- pure functions --
def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    torch.testing.assert_close(batch_mean_baseline(r, False), torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]]))
    std0 = math.sqrt(1 / 3)  # unbiased std of [.5,-.5,-.5,.5]
    torch.testing.assert_close(batch_mean_baseline(r, True)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std0)
    g = group_normalized(r, True)
    torch.testing.assert_close(g[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    torch.testing.assert_close(group_normalized(r, False), batch_mean_baseline(r, False))
    # RLOO: r_i minus the mean of the other three
    torch.testing.assert_close(leave_one_out(r)[1], torch.tensor([-1.0, -1.0, -1.0, 3.0]))
    torch.testing.assert_close(leave_one_out(r)[0], torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]))
    # all-equal groups give zero advantages, never NaN
    assert torch.all(group_normalized(torch.ones(2, 4), True) == 0)
    assert torch.all(batch_mean_baseline(torch.ones(1, 4), True) == 0)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([[math.exp(-0.5) + 0.5 - 1, 0.0]]))
    assert kl_k3(torch.tensor([[0.0]]), torch.tensor([[-100.0]])).item() <= 10.0  # clamped


def test_policy_loss_reinforce_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, m = policy_loss(logp, logp.detach(), adv, mask, StepSize.of([mask]), aggregation="seq_sum")
    # The surrogate -A·ρ (ρ = 1) has the same gradient as the seed's -A·Σ_t log π; its value is
    # -mean_i A_i·|tokens_i| = -(2·2 + (-1)·3) / 2 = -0.5.
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]]))  # -A_i*mask/N
    assert m["clip_fraction"].item() == 0.0


def test_policy_loss_aggregations_and_kl():
    logp = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([1.0, 1.0])
    # ratio 1: per-token pg = -A = -1 on every masked token
    step = StepSize.of([mask])
    assert (step.sequences, step.tokens) == (2, 3)
    grpo, _ = policy_loss(logp, logp, adv, mask, step, aggregation="grpo")
    dapo, _ = policy_loss(logp, logp, adv, mask, step, aggregation="dapo")
    dr, _ = policy_loss(logp, logp, adv, mask, step, aggregation="dr_grpo", max_len=4)
    assert grpo.item() == pytest.approx(-1.0) and dapo.item() == pytest.approx(-1.0)
    assert dr.item() == pytest.approx(-3 / (2 * 4))
    ref = logp - 0.1
    with_kl, m = policy_loss(logp, logp, adv, mask, step, ref_logp=ref, beta=0.5, kl_estimator="k1", aggregation="grpo")
    assert m["kl"].item() == pytest.approx(0.1, abs=1e-6)
    assert with_kl.item() == pytest.approx(-1.0 + 0.5 * 0.1, abs=1e-6)


def test_clipping_by_hand():
    logp = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-1.0]])  # ratio e ≈ 2.718 > 1.2
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), StepSize(1, 1), eps_high=0.2, aggregation="dapo")
    assert loss.item() == pytest.approx(-1.2) and m["clip_fraction"].item() == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0  # clipped: no gradient pushes the ratio further
    loss, m = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), StepSize(1, 1), eps_high=0.2, aggregation="dapo")
    assert loss.item() == pytest.approx(math.e) and m["clip_fraction"].item() == 0.0


def _step_gradient(model, batch, cfg):
    """The gradient of one optimizer step of ``update`` on ``batch`` (single process)."""
    from posttrain.trainers.rl import update
    from posttrain.trainers.run import make_accelerator

    model.zero_grad(set_to_none=True)
    finite, stats = update(model, batch, cfg, make_accelerator())
    assert finite
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, stats


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_step_gradient_does_not_depend_on_the_micro_batch_split(tiny_model, toy_file, loss_type):
    """16 completions as 16×1, 4×4 and 1×16 micro-batches: the same gradient, KL term included."""
    assert loss_type in SPLIT_INVARIANT
    model = tiny_model.train()
    batch = random_rl_batch(model.config.vocab_size)
    grads = []
    for mb, accum in ((1, 16), (4, 4), (16, 1)):
        cfg = RLConfig(algo="grpo", loss_type=loss_type, beta=0.1, num_generations=4, per_device_batch_size=mb,
                       gradient_accumulation_steps=accum, max_new_tokens=8, reward=[f"{toy_file}:low_ids"])
        grads.append(_step_gradient(model, batch, cfg)[0])
    for other in grads[1:]:
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], atol=1e-6, rtol=1e-4)


def test_micro_batches_are_cut_to_their_own_longest_row():
    batch = random_rl_batch(50, n=6, width=12, seed=3)
    lengths = batch.attention_mask.sum(1)
    mbs = batch.micro_batches(4)
    assert [len(mb.input_ids) for mb in mbs] == [4, 2]
    for mb, rows in zip(mbs, (slice(0, 4), slice(4, 6))):
        w = int(lengths[rows].max())
        assert mb.input_ids.shape[1] == w and mb.completion_mask.shape[1] == mb.ref_logp.shape[1] == w - 1
        assert torch.equal(mb.input_ids, batch.input_ids[rows, :w]) and torch.equal(mb.ref_logp, batch.ref_logp[rows, :w - 1])
        assert batch.completion_mask[rows, w - 1:].sum() == 0  # nothing scored was cut off
        assert torch.equal(mb.advantages, batch.advantages[rows])


def test_micro_batches_by_length_group_rows_of_like_lengths():
    """Longest rows first, so each micro-batch pads to little; every row exactly once, each micro-batch
    knowing its rows (the log-probs it computes go back to them)."""
    batch = random_rl_batch(50, n=8, width=12, seed=3)
    lengths = batch.attention_mask.sum(1).tolist()
    mbs = batch.micro_batches(4, by_length=True)
    assert sorted(r for mb in mbs for r in mb.rows) == list(range(8))
    assert [lengths[r] for mb in mbs for r in mb.rows] == sorted(lengths, reverse=True)
    for mb in mbs:
        assert mb.input_ids.shape[1] == max(lengths[r] for r in mb.rows)
        assert torch.equal(mb.input_ids, batch.input_ids[mb.rows, :mb.input_ids.shape[1]])
        assert torch.equal(mb.advantages, batch.advantages[mb.rows])
    padded = sum(mb.input_ids.numel() for mb in mbs)
    assert padded < sum(mb.input_ids.numel() for mb in batch.micro_batches(4))  # less padding than in rollout order


@pytest.mark.parametrize("loss_type,by_length", [("dapo", True), ("grpo", True), ("bnpo", False)])
def test_the_update_groups_rows_by_length_unless_the_loss_depends_on_the_grouping(tiny_model, toy_file, monkeypatch,
                                                                                    loss_type, by_length):
    """bnpo averages over each micro-batch's tokens: its micro-batches stay in the rollout's order."""
    asked = []
    real = Batch.micro_batches
    monkeypatch.setattr(Batch, "micro_batches", lambda self, *a, **kw: asked.append(kw.get("by_length")) or real(self, *a, **kw))
    cfg = RLConfig(algo="grpo", loss_type=loss_type, num_generations=4, per_device_batch_size=4, gradient_accumulation_steps=4,
                   max_new_tokens=8, reward=[f"{toy_file}:low_ids"])
    _step_gradient(tiny_model.train(), random_rl_batch(tiny_model.config.vocab_size), cfg)
    assert asked == [by_length]


def test_reference_logprobs_land_on_their_rows_whatever_the_micro_batches(tiny_model):
    """fill_logprobs runs micro-batches longest first: its [B, L-1] result is, row for row, the
    reference log-probs of the whole batch in its own order."""
    from posttrain.trainers.logprobs import reference_logprobs
    from posttrain.trainers.rl import fill_logprobs
    from posttrain.trainers.run import make_accelerator

    batch, model, ref = random_rl_batch(tiny_model.config.vocab_size), tiny_model.eval(), copy.deepcopy(tiny_model)
    with torch.no_grad():
        expected = reference_logprobs(model, ref, batch.input_ids, batch.attention_mask, batch.completion_mask,
                                      make_accelerator(), right_padded=True)
    for size in (16, 2):
        b = Batch(batch.input_ids, batch.attention_mask, batch.completion_mask, batch.advantages)
        cfg = RLConfig(algo="grpo", beta=0.1, num_generations=4, per_device_batch_size=size, gradient_accumulation_steps=16 // size,
                       max_new_tokens=8, reward=["correctness"])
        fill_logprobs(b, model, ref, cfg, make_accelerator())
        assert b.ref_logp.shape == batch.completion_mask.shape
        torch.testing.assert_close(b.ref_logp * batch.completion_mask, expected.float() * batch.completion_mask, atol=1e-5, rtol=1e-5)
        assert (b.ref_logp * (1 - batch.completion_mask)).abs().sum() == 0  # nothing outside the completions


def test_a_token_budget_cuts_micro_batches_into_pieces_within_it():
    batch = random_rl_batch(50, n=8, width=12, seed=3)
    lengths = batch.attention_mask.sum(1).tolist()
    mbs = batch.micro_batches(4, max_tokens=2 * max(lengths))
    assert sum(len(mb.input_ids) for mb in mbs) == 8 and len(mbs) >= 4  # no piece spans two micro-batches of 4
    assert torch.equal(torch.cat([mb.advantages for mb in mbs]), batch.advantages)  # every row once, in order
    assert all(mb.input_ids.numel() <= 2 * max(lengths) for mb in mbs)


def test_the_token_budget_leaves_the_step_gradient_as_it_is(tiny_model, toy_file):
    """Pieces of 1-2 rows instead of micro-batches of 8: the same gradient (the update's memory knob)."""
    model = tiny_model.train()
    batch = random_rl_batch(model.config.vocab_size)
    whole, pieces = batch.micro_batches(8), batch.micro_batches(8, 20)
    assert len(whole) == 2 and len(pieces) > 4 and all(mb.input_ids.numel() <= 20 for mb in pieces)
    grads = []
    for budget in (None, 20):
        cfg = RLConfig(algo="grpo", beta=0.1, num_generations=4, per_device_batch_size=8, gradient_accumulation_steps=2,
                       max_new_tokens=8, reward=[f"{toy_file}:low_ids"], update_max_tokens=budget)
        grads.append(_step_gradient(model, batch, cfg)[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4)
    with pytest.raises(PosttrainError, match="bnpo"):
        RLConfig(algo="grpo", loss_type="bnpo", reward=["correctness"], update_max_tokens=512)
    with pytest.raises(PosttrainError, match="at least 1"):
        RLConfig(algo="grpo", reward=["correctness"], update_max_tokens=0)


def test_bnpo_is_the_split_dependent_one_and_seq_sum_is_not(tiny_model, toy_file):
    model = tiny_model.double().train()  # float64: splits differ in padding, so fp32 rounding would differ too
    batch = random_rl_batch(model.config.vocab_size, seed=1)
    batch.ref_logp = batch.ref_logp.double()

    def grad(algo, loss_type, mb):
        cfg = RLConfig(algo=algo, loss_type=loss_type, num_generations=1 if algo == "reinforce" else 4, per_device_batch_size=mb,
                       gradient_accumulation_steps=16 // mb, max_new_tokens=8, beta=0.1, reward=[f"{toy_file}:low_ids"])
        return _step_gradient(model, batch, cfg)[0]["model.embed_tokens.weight"]

    torch.testing.assert_close(grad("reinforce", "grpo", 2), grad("reinforce", "grpo", 16), atol=1e-12, rtol=1e-10)  # seq_sum
    assert not torch.allclose(grad("grpo", "bnpo", 2), grad("grpo", "bnpo", 16), atol=1e-6, rtol=1e-4)


def test_reinforce_baseline_does_not_depend_on_the_micro_batch_size(toy_file):
    from posttrain.trainers.rl import compute_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    advs = [compute_advantages(rewards, RLConfig(algo="reinforce", num_generations=1, per_device_batch_size=mb,
                                                 gradient_accumulation_steps=8 // mb, baseline_group_size=4,
                                                 reward=[f"{toy_file}:low_ids"]))
            for mb in (1, 2, 8)]
    assert advs[0][0].tolist() == advs[1][0].tolist() == advs[2][0].tolist()
    torch.testing.assert_close(advs[0][0], batch_mean_baseline(rewards.view(2, 4), True).reshape(-1))
    # default: the whole step on this rank is one group
    adv, all_equal = compute_advantages(rewards, RLConfig(algo="reinforce", num_generations=1, per_device_batch_size=2,
                                                          gradient_accumulation_steps=4, reward=[f"{toy_file}:low_ids"]))
    torch.testing.assert_close(adv, batch_mean_baseline(rewards.view(1, 8), True).reshape(-1))
    assert all_equal == 0.0
    with pytest.raises(PosttrainError, match="baseline-group-size 3 must divide"):
        RLConfig(algo="reinforce", num_generations=1, per_device_batch_size=2, gradient_accumulation_steps=4, baseline_group_size=3)


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    logp, ent = token_logprobs(logits, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(0.75))
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_rollout_mask_covers_generated_tokens_through_eos_only():
    prompts = [[1, 5, 6], [1, 7]]
    comps = [Completion(0, [8, 9, 2], "", "eos"), Completion(1, [4, 4, 4, 4], "", "length")]
    ids, attn, cmask = sequence_tensors(prompts, comps, pad_id=0, mask_truncated=False, device="cpu")
    assert ids.tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 4, 4, 4, 4]]
    # mask[t] scores token t+1: row 0 scores tokens at 3,4,5 (8, 9, EOS); row 1 at 2..5
    assert cmask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
    comps2 = [Completion(0, [8, 2], "", "eos"), Completion(1, [4, 4, 4, 4], "", "length")]
    ids, attn, cmask = sequence_tensors(prompts, comps2, pad_id=0, mask_truncated=True, device="cpu")
    assert cmask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]  # padding and truncated rows excluded
    assert attn.tolist()[0] == [1, 1, 1, 1, 1, 0]


# ------------------------------------------------------------------------------------------ rewards --
def test_builtin_rewards_seed003():
    good = "<thinking>\n2+2=4\n</thinking>\n<answer>\n4\n</answer>"
    comps = [[{"role": "assistant", "content": good}], [{"role": "assistant", "content": good + "\nextra"}], ["bad"]]
    kw = dict(prompts=[""] * 3, completions=comps, answer=["#### 4"] * 3)
    assert REWARDS["strict_format"](**kw) == [1.0, -1.0, -1.0]
    assert REWARDS["xml_count"](**kw) == [0.0, -0.5, -0.5]
    assert REWARDS["int_answer"](**kw) == [1.0, 1.0, -1.0]
    assert REWARDS["correctness"](**kw) == [1.0, 1.0, 0.0]
    total, per = compute_rewards([parse_reward("correctness:2"), parse_reward("xml_count")], **kw)
    assert total == [2.0, 1.5, -0.5] and set(per) == {"correctness", "xml_count"}


def test_random_reward_is_a_fair_coin_blind_to_correctness_and_reproducible():
    right = [f"<thinking>\nso\n</thinking>\n<answer>\n{i}\n</answer>" for i in range(400)]
    kw = dict(prompts=[f"q{i}" for i in range(400)], completions=right, answer=[f"#### {i}" for i in range(400)])
    values = REWARDS["random"](**kw)
    assert set(values) == {0.0, 1.0} and 160 < sum(values) < 240  # every completion is right; about half rewarded
    assert REWARDS["random"](**kw) == values  # a rerun (or a resumed run) gives the same rewards
    wrong = REWARDS["random"](**{**kw, "answer": ["#### -1"] * 400})
    assert wrong == values  # the gold answer plays no part
    assert REWARDS["random"](**{**kw, "prompts": [f"other {i}" for i in range(400)]}) != values


def test_custom_reward_loading_and_errors(toy_file):
    r = parse_reward(f"{toy_file}:low_ids:0.5")
    assert r.weight == 0.5 and r.name == "toy.low_ids"
    total, _ = compute_rewards([r], prompts=["p"], completions=["c"], answer=["1"], completion_ids=[[1, 200]])
    assert total == [0.25]
    with pytest.raises(PosttrainError, match="'toy.boom' raised ValueError"):
        compute_rewards([parse_reward(f"{toy_file}:boom")], prompts=["p"] * 2, completions=["a", "b"], answer=["1"] * 2)
    with pytest.raises(PosttrainError, match="'toy.short' returned 1 rewards for 2"):
        compute_rewards([parse_reward(f"{toy_file}:short")], prompts=["p"] * 2, completions=["a", "b"], answer=["1"] * 2)
    with pytest.raises(PosttrainError, match="no function 'missing'"):
        parse_reward(f"{toy_file}:missing")
    with pytest.raises(PosttrainError, match="unknown reward"):
        parse_reward("helpfulness")


@pytest.mark.parametrize("returned,message", [
    ("1111", "returned str '1111', not a list of 4 numbers"),
    ({"a": 1.0}, "returned dict"),
    (None, "returned NoneType"),
    (1.0, "returned float"),
    ([1.0, 0.0], "returned 2 rewards for 4 completions"),
    ([1.0, "0.5", 0.0, 1.0], "returned '0.5' (str) for completion 1; rewards must be numbers"),
    ([1.0, None, 0.0, 1.0], "returned None (NoneType) for completion 1"),
    ([1.0, float("nan"), 0.0, 1.0], "returned nan for completion 1; rewards must be finite"),
])
def test_a_reward_of_the_wrong_shape_is_a_one_line_error_naming_it(returned, message):
    from posttrain.tasks.rewards import WeightedReward

    bad = WeightedReward("mine.f", lambda **kw: returned, 1.0)
    with pytest.raises(PosttrainError) as e:
        compute_rewards([bad], prompts=["p"] * 4, completions=["a"] * 4, answer=["1"] * 4)
    assert "reward function 'mine.f'" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    import numpy as np
    import torch

    for ok in ([True, False, 1, 0.5], (1, 0, 1, 0), np.array([1.0, 0, 1, 0]), torch.tensor([1.0, 0, 1, 0])):  # numbers, any sequence
        total, _ = compute_rewards([WeightedReward("ok", lambda ok=ok, **kw: ok, 2.0)], prompts=["p"] * 4, completions=["a"] * 4, answer=["1"] * 4)
        assert total[1] == 0.0 and total[0] == 2.0


def test_config_validation():
    with pytest.raises(PosttrainError, match="num-generations"):
        RLConfig(algo="grpo", num_generations=1)
    with pytest.raises(PosttrainError, match="multiple"):
        RLConfig(algo="grpo", num_generations=3, per_device_batch_size=4, gradient_accumulation_steps=1)
    with pytest.raises(PosttrainError, match="unknown --algo"):
        RLConfig(algo="ppo")
    assert RLConfig(algo="reinforce", num_generations=1).spec == {
        "advantage": "batch_mean", "group": "batch", "aggregation": "seq_sum", "kl_estimator": "k1"}


# ------------------------------------------------------------------------------------------ training --
def _cfg(model_dir, out, toy_file, **kw):
    base = dict(model=str(model_dir), output=str(out), method="full", learning_rate=3e-3, reward=[f"{toy_file}:low_ids"],
                max_new_tokens=8, num_generations=8, per_device_batch_size=16, gradient_accumulation_steps=2,
                max_steps=25, eval_steps=0, engine="hf", beta=0.0, report_to=[], train_limit=200, save_steps=0)
    base.update(kw)
    return RLConfig(**base)


def _rewards(out):
    return [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_engine_is_reserved_for_the_runs_longest_prompt(tiny_model_dir, tmp_path, toy_file, monkeypatch):
    """RL tells its engine the longest training prompt once, before the first rollout (one KV cache and
    one set of CUDA graphs for the run)."""
    from posttrain.engine.fast import FastEngine
    from posttrain.trainers import rl

    seen, made = [], []
    real, prompts = FastEngine.reserve, rl.Prompts
    monkeypatch.setattr(FastEngine, "reserve", lambda self, n: seen.append((n, self.scheduler.kv)) or real(self, n))
    monkeypatch.setattr(rl, "Prompts", lambda *a: made.append(prompts(*a)) or made[-1])
    train(_cfg(tiny_model_dir, tmp_path / "r", toy_file, engine="fast", max_steps=1))
    longest = max(len(p) for p in made[0].ids)
    assert seen == [(longest, None)]  # before any rollout made a cache
    assert min(len(p) for p in made[0].ids) < longest  # the prompts differ in length: the reserve is the longest's


@pytest.mark.parametrize("algo,g", [("grpo", 8), ("reinforce", 1)])
def test_toy_reward_rises(tiny_model_dir, tmp_path, toy_file, algo, g):
    train(_cfg(tiny_model_dir, tmp_path / algo, toy_file, algo=algo, num_generations=g))
    r = _rewards(tmp_path / algo)
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.08, r


def test_drop_zero_advantage_trains_only_groups_with_signal(tiny_model_dir, tmp_path, toy_file):
    train(_cfg(tiny_model_dir, tmp_path / "half", toy_file, reward=[f"{toy_file}:half_const"], max_steps=3,
               drop_zero_advantage=True))
    rows = [json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # whole groups of 8 are left out: exactly those whose rewards were all equal
        assert r["trained_completions"] == max(1, round(32 * (1 - r["frac_groups_all_equal"])))
    assert any(0 < r["trained_completions"] < 32 for r in rows)


def test_drop_zero_advantage_with_no_signal_leaves_the_model_unchanged(tiny_model_dir, tmp_path, toy_file):
    from safetensors.torch import load_file

    out = tmp_path / "const"
    train(_cfg(tiny_model_dir, out, toy_file, reward=[f"{toy_file}:const"], max_steps=2, drop_zero_advantage=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained_completions"] for r in rows] == [1, 1]  # one row kept so every rank runs a backward
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in after:
        torch.testing.assert_close(after[k], before[k].to(after[k].dtype))


def test_kl_is_zero_at_step_zero_with_lora(tiny_model_dir, tmp_path, toy_file):
    train(_cfg(tiny_model_dir, tmp_path / "kl", toy_file, method="lora", beta=0.1, max_steps=2, learning_rate=1e-2))
    rows = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kl"]) < 1e-6  # adapter starts at zero: policy == reference
    assert rows[1]["kl"] > 0  # after one update the policy has moved (k3 >= 0)


def test_rl_resume_matches_uninterrupted(tiny_model_dir, tmp_path, toy_file):
    import shutil

    from safetensors.torch import load_file

    kw = dict(method="lora", max_steps=4, save_steps=2, lora_dropout=0.0, learning_rate=1e-2)
    train(_cfg(tiny_model_dir, tmp_path / "a", toy_file, **kw))
    b = tmp_path / "b"
    train(_cfg(tiny_model_dir, b, toy_file, **kw))
    shutil.rmtree(b / "checkpoints" / "step-4")
    (b / "run_state.json").unlink()
    train(_cfg(tiny_model_dir, b, toy_file, resume=True, **kw))
    wa, wb = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_rl_cli(tiny_model_dir, tmp_path, toy_file):
    out = tmp_path / "cli"
    r = run_cli("rl", "--model", tiny_model_dir, "--algo", "rloo", "--reward", "correctness", "--reward", f"{toy_file}:low_ids:0.5",
                "--max-new-tokens", 6, "--num-generations", 4, "--per-device-batch-size", 8, "--gradient-accumulation-steps", 1,
                "--max-steps", 2, "--eval-steps", 2, "--eval-samples", 4, "--engine", "hf", "--output", out, "--train-limit", 20)
    assert r.returncode == 0, r.stderr
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward_mean", "reward_std", "reward/correctness", "reward/toy.low_ids", "accuracy", "frac_groups_all_equal",
                "kl", "entropy", "clip_fraction", "completion_len_mean", "completion_len_max", "truncation_rate",
                "rollout_tokens_per_s", "train_tokens_per_s", "eval_accuracy"):
        assert key in last, key
    assert (out / "adapter_model.safetensors").exists()
    r = run_cli("rl", "--model", tiny_model_dir, "--reward", f"{toy_file}:boom", "--max-steps", 1, "--max-new-tokens", 4,
                "--output", tmp_path / "boom", "--engine", "hf", "--train-limit", 8, "--eval-steps", 0)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "'toy.boom' raised ValueError" in r.stderr


def test_nan_steps_are_skipped_then_stop(tiny_model_dir, tmp_path, toy_file, monkeypatch, capsys):
    import posttrain.trainers.rl as rl

    monkeypatch.setattr(rl, "policy_loss", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
    with pytest.raises(PosttrainError, match="3 steps in a row had NaN"):
        train(_cfg(tiny_model_dir, tmp_path / "nan", toy_file, max_steps=5))
    assert capsys.readouterr().out.count("step skipped") == 3


def test_reference_with_other_tokenizer_is_refused(tiny_model_dir, tmp_path, toy_file):
    from posttrain.tokenization import train_bpe_tokenizer

    other = tmp_path / "other"
    from conftest import make_tiny_model

    tok = train_bpe_tokenizer(["completely different words here"] * 50, vocab_size=300)
    make_tiny_model(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(PosttrainError, match="different tokenizer"):
        train(_cfg(tiny_model_dir, tmp_path / "ref", toy_file, beta=0.1, ref_model=str(other), max_steps=1))


def test_one_engine_serves_rollouts_and_evaluations(tiny_model_dir, tmp_path, toy_file, monkeypatch):
    import posttrain.engine as engine_mod

    built, synced = [], []
    real = engine_mod.make_engine

    def counting(*a, **k):
        engine = real(*a, **k)
        sync = engine.sync_weights
        engine.sync_weights = lambda policy: synced.append(1) or sync(policy)
        built.append(engine)
        return engine

    monkeypatch.setattr(engine_mod, "make_engine", counting)
    train(_cfg(tiny_model_dir, tmp_path / "e", toy_file, max_steps=3, eval_steps=1, eval_samples=4))
    assert len(built) == 1 and built[0].name == "hf"  # 3 rollouts and 3 evaluations, one engine, as asked
    assert len(synced) == 3  # told of every update before it generated again (evaluation or rollout), once each


def test_nan_rewards_are_named_not_blamed_on_the_learning_rate(tiny_model_dir, tmp_path, toy_file):
    with pytest.raises(PosttrainError, match="'toy.nan_reward' returned nan for completion 0; rewards must be finite"):
        train(_cfg(tiny_model_dir, tmp_path / "nan", toy_file, reward=[f"{toy_file}:nan_reward"], max_steps=1))


def _reference_token_logprobs(logits, tokens):
    """The previous implementation: whole-batch fp32 log-softmax (kept as the reference)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, tokens[..., None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_equal_the_full_softmax_and_hold_far_less_for_backward(dtype):
    torch.manual_seed(0)
    n, t, v = 4, 37, 3001
    base = (torch.randn(n, t, v) * 3).to(dtype)
    tokens = torch.randint(0, v, (n, t))
    weights = torch.randn(n, t)

    def run(fn, **kw):
        x = base.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel() * s.element_size()) or s, lambda s: s):
            logp, ent = fn(x, tokens, **kw)
            loss = (logp * weights).sum()
        loss.backward()
        return logp.detach(), ent, x.grad, sum(saved)

    ref = run(_reference_token_logprobs)
    ours = run(token_logprobs, chunk_elements=n * v * 5)  # 8 chunks of 5 positions
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ours[0], ref[0], **tol)
    torch.testing.assert_close(ours[1], ref[1], **tol)
    torch.testing.assert_close(ours[2].float(), ref[2].float(), **tol)
    assert ours[3] * 2 <= ref[3], (ours[3], ref[3])  # what autograd keeps until backward: at least halved


def test_the_engine_is_synced_once_per_rollout_not_per_update(tiny_model_dir, tmp_path, toy_file, monkeypatch):
    import posttrain.engine as engine_mod

    synced, real = [], engine_mod.make_engine

    def counting(*a, **k):
        engine = real(*a, **k)
        sync = engine.sync_weights
        engine.sync_weights = lambda policy: synced.append(1) or sync(policy)
        return engine

    monkeypatch.setattr(engine_mod, "make_engine", counting)
    train(_cfg(tiny_model_dir, tmp_path / "it", toy_file, max_steps=6, num_iterations=3, eval_steps=0))
    assert len(synced) == 1  # 2 rollouts x 3 updates: the second rollout needed the policy of step 3, once


def test_answers_only_rewards_never_see_a_worked_solution(tiny_model_dir, tmp_path, monkeypatch):
    spy = tmp_path / "spy.py"
    spy.write_text("import json, os\n"
                   "def spy(prompts, completions, answer, **kw):\n"
                   "    with open(os.environ['SPY_LOG'], 'a') as f:\n"
                   "        f.write(json.dumps(answer) + '\\n')\n"
                   "    return [0.0] * len(completions)\n")
    monkeypatch.setenv("SPY_LOG", str(tmp_path / "answers.jsonl"))
    cfg = RLConfig(model=str(tiny_model_dir), output=str(tmp_path / "rl"), method="full", task="gsm_symbolic", max_steps=2,
                   num_generations=2, per_device_batch_size=4, gradient_accumulation_steps=1, max_new_tokens=4, beta=0.0,
                   eval_steps=0, save_steps=0, report_to=[], reward=[f"{spy}:spy"], train_limit=8, train_offset=4, answers_only=True)
    train(cfg)
    seen = [a for line in (tmp_path / "answers.jsonl").read_text().splitlines() for a in json.loads(line)]
    assert len(seen) == 8 and all(a.startswith("#### ") and "\n" not in a for a in seen)  # 2 steps × 4 completions


def test_training_problems_offset_validation_and_answers_only():
    from posttrain.tasks import make_task
    from posttrain.trainers.rl import training_problems

    task = make_task("gsm_symbolic")
    rows = task.examples("train")
    cfg = RLConfig(train_offset=10, train_limit=20, validation_size=30, answers_only=True, eval_steps=5, eval_samples=25)
    train_set, held_out = training_problems(task, cfg)
    assert [e.id for e in train_set] == [e.id for e in rows[10:30]] and all(e.response == "" for e in train_set)
    assert [e.id for e in held_out] == [e.id for e in rows[-30:-5]]  # the train split's tail, never its head
    assert rows[10].response  # the task itself still has the solutions; only RL's copy drops them
    with pytest.raises(PosttrainError, match="no training examples left"):
        training_problems(task, RLConfig(train_offset=len(rows) - 30, validation_size=30))
    _, test_held_out = training_problems(task, RLConfig(eval_steps=5, eval_samples=7))
    assert [e.id for e in test_held_out] == [e.id for e in task.examples("test")[:7]]


@pytest.mark.parametrize("bias,scored", [(False, False), (True, False), (False, True)])
def test_fused_head_logprobs_equal_projection_then_softmax_and_never_hold_logits(bias, scored):
    from posttrain.losses.policy import linear_token_logprobs

    torch.manual_seed(0)
    n, t, d, v = 3, 29, 16, 2003
    h0, w0 = torch.randn(n, t, d), torch.randn(v, d) / 4
    b0 = torch.randn(v) if bias else None
    tokens, weights = torch.randint(0, v, (n, t)), torch.randn(n, t)
    where = torch.rand(n, t) < 0.6 if scored else None  # only these positions are computed; 0 elsewhere
    keep = where if scored else torch.ones(n, t, dtype=torch.bool)

    def run(fused):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True) if bias else None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel()) or s, lambda s: s):
            if fused:
                logp, ent = linear_token_logprobs(h, w, b, tokens, where, chunk_elements=v * 11)  # chunks of 11 positions
            else:
                logp, ent = _reference_token_logprobs(torch.nn.functional.linear(h, w, b), tokens)
                logp, ent = logp.where(keep, 0.0), ent.where(keep, 0.0)
        (logp * weights).sum().backward()
        return logp.detach(), ent, h.grad, w.grad, b.grad if bias else None, max(saved)

    ref, ours = run(False), run(True)
    for a, r in zip(ours[:5], ref[:5]):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    assert (ours[0][~keep] == 0).all() and (ours[0][keep] != 0).all()
    assert ref[5] >= n * t * v  # the unfused path keeps whole-batch logits for backward
    assert ours[5] <= v * d  # the fused one nothing larger than the weight it was given


def test_sequence_logprobs_through_the_fused_head_equal_the_logits_path(tiny_model, tiny_tokenizer):
    """A LoRA policy under autocast: the hook-and-project path gives the model's own logits' values and
    gradients, and the [N, L, V] logits are never formed."""
    from peft import LoraConfig, get_peft_model

    from posttrain.trainers import logprobs

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert logprobs.output_head(model) is model.get_base_model().lm_head
    ids = torch.randint(5, len(tiny_tokenizer), (3, 17), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # a left-padded row
    scored = torch.ones(3, 16)
    scored[1, :9] = 0  # a prompt: not scored

    def run(fused):
        model.zero_grad(set_to_none=True)
        head = logprobs.output_head
        if not fused:
            logprobs.output_head = lambda m: None
        try:
            logp, ent = logprobs.sequence_logprobs(model, ids, attn, scored)
        finally:
            logprobs.output_head = head
        logp.sum().backward()
        return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ours = run(False), run(True)
    assert (ours[0][1, :9] == 0).all() and (ours[0][scored > 0] != 0).all()
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)
    assert ref[2].keys() == ours[2].keys() and len(ref[2]) == sum(p.requires_grad for p in model.parameters())
    for k in ref[2]:
        torch.testing.assert_close(ours[2][k], ref[2][k], atol=1e-5, rtol=1e-4)


def test_quantized_rollouts_is_checked_before_a_model_loads(tmp_path):
    from posttrain.trainers.rl import RLConfig

    assert RLConfig(model="m", output=str(tmp_path / "o")).quantized_rollouts == "auto"
    with pytest.raises(PosttrainError, match="unknown --quantized-rollouts 'int4'; choose one of auto, dequantized, transient, 4bit"):
        RLConfig(model="m", output=str(tmp_path / "o"), quantized_rollouts="int4")


@pytest.mark.parametrize("every", [1, 2])
def test_a_checkpointed_update_recomputes_attention_on_the_forwards_kernels(tiny_model, toy_file, monkeypatch, every):
    """With gradient checkpointing the backward runs a layer's forward again; it must choose among the
    attention kernels the forward chose (``sdpa_backends``: not cuDNN's), else the recomputed tensors
    differ from the saved ones and torch's checkpoint refuses the step (seen on the 8B QLoRA shape on
    an H200: the forward ran flash attention, the recompute cuDNN's). ``checkpoint_every`` 2
    recomputes every other layer; either way, the gradient is the one without checkpointing."""
    from posttrain.trainers.setup import enable_checkpointing

    model = tiny_model.train()
    cfg = RLConfig(algo="grpo", beta=0.1, num_generations=4, per_device_batch_size=8, gradient_accumulation_steps=2,
                   max_new_tokens=8, reward=[f"{toy_file}:low_ids"])
    batch = random_rl_batch(model.config.vocab_size)
    plain = _step_gradient(model, batch, cfg)[0]
    layers = model.config.num_hidden_layers
    assert enable_checkpointing(model, every) == [i % every == 0 for i in range(layers)]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        calls.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    checkpointed = _step_gradient(model, batch, cfg)[0]
    assert len(calls) == 2 * (layers + len(range(0, layers, every)))  # two micro-batches: every forward, then the recomputes
    assert not any(calls)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])



def test_compiled_layers_give_the_update_the_plain_layers_gradient(tiny_model, toy_file):
    """``--compile-layers`` compiles each decoder layer in place (dynamo traces it; CPU tests use the
    aot_eager backend, which runs the traced forward and backward graphs without generating kernels).
    Two micro-batches of different widths reuse the dynamic graph: the step's gradient is the
    uncompiled layers' gradient. With gradient checkpointing the option is refused before anything loads."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from posttrain.trainers.setup import compile_layers

    model = tiny_model.train()
    cfg = RLConfig(algo="grpo", beta=0.1, num_generations=4, per_device_batch_size=8, gradient_accumulation_steps=2,
                   max_new_tokens=8, reward=[f"{toy_file}:low_ids"])
    batch = random_rl_batch(model.config.vocab_size)
    batch.attention_mask[8:, 9:] = 0  # the second micro-batch's rows at most 9 tokens long
    batch.completion_mask[8:, 8:] = 0
    assert [mb.input_ids.shape[1] for mb in batch.micro_batches(8)] == [12, 9]
    plain = _step_gradient(model, batch, cfg)[0]
    torch._dynamo.reset()
    counters.clear()
    assert compile_layers(model, backend="aot_eager") == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    compiled = _step_gradient(model, batch, cfg)[0]
    assert counters["stats"]["unique_graphs"] == 1  # every layer and both widths: one graph, none run uncompiled
    torch._dynamo.reset()
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name])
    with pytest.raises(PosttrainError, match="--compile-layers and --gradient-checkpointing do not go together"):
        RLConfig(model="m", compile_layers=True, gradient_checkpointing=True)


def test_compiled_lora_layers_share_one_graph_and_widths_are_multiples_of_8(tiny_model, toy_file):
    """A LoRA policy's compiled layers: the first layer's input (the frozen embeddings' output) is made
    to require a gradient like every other layer's, so the update over two micro-batch widths runs one
    graph where it took two (dynamo's guard on ``requires_grad``), and a reference pass one more; the
    update's gradient is the plain layers'.
    With compiled layers the RL batch rounds every width up to a multiple of 8 (inductor specialises on
    it); without, widths are the longest rows'."""
    import torch._dynamo
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters

    from posttrain.trainers.rl import Batch, sequence_tensors
    from posttrain.trainers.setup import compile_layers

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)).train()
    cfg = RLConfig(algo="grpo", beta=0.0, num_generations=4, per_device_batch_size=8, gradient_accumulation_steps=2,
                   max_new_tokens=8, reward=[f"{toy_file}:low_ids"])
    batch = random_rl_batch(model.config.vocab_size)
    batch.attention_mask[8:, 9:] = 0
    batch.completion_mask[8:, 8:] = 0
    plain = _step_gradient(model, batch, cfg)[0]
    torch._dynamo.reset()
    counters.clear()
    compile_layers(model, backend="aot_eager")
    compiled = _step_gradient(model, batch, cfg)[0]
    assert counters["stats"]["unique_graphs"] == 1
    from posttrain.trainers.logprobs import reference_logprobs
    from posttrain.trainers.run import make_accelerator

    for mb in batch.micro_batches(8):  # the reference pass (no gradients, adapter off): one more graph
        reference_logprobs(model, None, mb.input_ids, mb.attention_mask, mb.completion_mask, make_accelerator(), right_padded=True)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
    assert plain.keys() == compiled.keys() and any("lora_B" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name])

    class C:  # a completion as sequence_tensors reads it
        def __init__(self, n):
            self.token_ids, self.finish_reason = list(range(1, n + 1)), "stop"

    ids, attn, cmask = sequence_tensors([[5, 6, 7]] * 3, [C(4), C(9), C(2)], 0, False, "cpu", multiple_of=8)
    assert ids.shape == (3, 16) and attn.sum(1).tolist() == [7, 12, 5] and cmask.sum(1).tolist() == [4, 9, 2]
    mbs = Batch(ids, attn, cmask, torch.zeros(3), multiple_of=8).micro_batches(1)
    assert [mb.input_ids.shape[1] for mb in mbs] == [8, 16, 8]
    assert [mb.input_ids.shape[1] for mb in Batch(ids, attn, cmask, torch.zeros(3)).micro_batches(1)] == [7, 12, 5]
    ids, attn, cmask = sequence_tensors([[5, 6, 7]] * 2, [C(4), C(4)], 0, False, "cpu", multiple_of=8)  # two rows of 7 tokens
    pieces = Batch(ids, attn, cmask, torch.zeros(2), multiple_of=8).micro_batches(2, max_tokens=14)  # the budget counts rounded widths
    assert [tuple(mb.input_ids.shape) for mb in pieces] == [(1, 8), (1, 8)]


def test_right_padded_rows_need_no_padding_mask(tiny_model, monkeypatch):
    """``right_padded``: attention gets no mask at all, only ``is_causal`` (SDPA may then run flash
    attention), and the completions' log-probs, entropies and gradients are those with the padding
    mask; padding only comes after a row's tokens, which the causal mask already keeps them from
    seeing. (Positions that repeat on the padding would read as packed sequences and bring a 4-D
    mask back.)"""
    from posttrain.trainers import logprobs

    model = tiny_model.train()
    batch = random_rl_batch(model.config.vocab_size)
    assert (batch.attention_mask == 0).any()  # rows of different lengths: padding at the right
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)

    def run(right_padded):
        model.zero_grad(set_to_none=True)
        logp, ent = logprobs.sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask, right_padded)
        logp.sum().backward()
        return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}

    masked = run(False)
    layers = model.config.num_hidden_layers
    assert len(seen) == layers and all(m is not None and m.dim() == 4 for m, _ in seen)  # the padding mask
    seen.clear()
    unmasked = run(True)
    assert seen == [(None, True)] * layers
    scored = batch.completion_mask > 0
    assert (masked[0][scored] != 0).all()
    torch.testing.assert_close(unmasked[0], masked[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unmasked[1], masked[1], atol=1e-5, rtol=1e-5)
    for name in masked[2]:
        torch.testing.assert_close(unmasked[2][name], masked[2][name], atol=1e-5, rtol=1e-4)


def _adamw_steps(dtype, init: torch.Tensor, lr: float, steps: int = 10):
    """A bias-free Linear with weights ``init`` in ``dtype``: (what ``rounded_away`` and
    ``warn_rounded_away`` find at ``lr``, the weights before, which weights AdamW steps changed)."""
    from posttrain.trainers.setup import rounded_away, warn_rounded_away

    layer = torch.nn.Linear(*init.shape, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(init.to(dtype))
    before = layer.weight.detach().clone()
    said = []
    found = rounded_away(layer, lr)
    warn_rounded_away(layer, lr, said.append)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        layer.weight.grad = torch.randn_like(layer.weight)
        opt.step()
    return found, said, before, layer.weight.detach() != before


def test_bf16_weights_that_a_small_learning_rate_cannot_move_are_found_and_said():
    """Full fine-tuning on bf16 weights at lr 2e-6: an AdamW step rounds away on every weight
    ``rounded_away`` counts (96% of N(0, 0.02) weights), which the trainers say in one line before
    training; fp32 weights take the same steps, and nothing is said for them, nor for a step bf16 can take."""
    torch.manual_seed(0)
    init = torch.randn(400, 400) * 0.02
    found, said, before, changed = _adamw_steps(torch.bfloat16, init, 2e-6)
    assert found[1] is torch.bfloat16 and 0.9 < found[0] < 1.0
    assert not changed[before.abs() > 4 * 2e-6 / torch.finfo(torch.bfloat16).eps].any()  # every weight counted stayed as it was
    assert changed.float().mean() < 0.1
    assert len(said) == 1 and "96% of the trainable weights are bf16" in said[0] and "--dtype fp32" in said[0]
    found, said, _, changed = _adamw_steps(torch.float32, init, 2e-6)
    assert found is None and said == [] and changed.float().mean() > 0.99
    found, said, _, _ = _adamw_steps(torch.bfloat16, init, 1e-3, steps=1)
    assert found[0] < 0.5 and said == []
