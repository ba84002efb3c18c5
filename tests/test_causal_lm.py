"""TokenPolicy on a tiny random Llama (saved and reloaded offline): rollout layout, determinism,
recompute = rollout (ratio 1), reference, and one GRPO update that moves the policy the right way."""

import pytest
import torch

torch.set_num_threads(1)

from flowrl.losses import LossInputs, LossSpec, policy_loss  # noqa: E402
from flowrl.pipelines.causal_lm import TokenPolicy, build_tiny_causal_lm, chosen_log_probs, top_p_filter  # noqa: E402
from flowrl.policy import Policy  # noqa: E402

PROMPTS = ["What is 2 + 3 ?", "What is 1 * 1 ?"]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    return build_tiny_causal_lm(str(tmp_path_factory.mktemp("tiny_llama")), seed=0)


@pytest.fixture()
def policy(tiny_lm_dir):
    torch.manual_seed(0)
    return TokenPolicy.from_pretrained(tiny_lm_dir, lora={"r": 4}, max_new_tokens=6)


def test_protocol_and_chat_template(policy):
    assert isinstance(policy, Policy)
    assert policy.format_prompt("What is 2 + 3 ?") == "<|user|> What is 2 + 3 ? <|assistant|> "
    plain = TokenPolicy(policy.model, policy.tokenizer, max_new_tokens=2, chat_template=False)
    assert plain.format_prompt("x") == "x"


def test_rollout_layout(policy):
    g = torch.Generator().manual_seed(0)
    traj = policy.rollout(PROMPTS, group_size=3, generator=g)
    B, T = 6, traj.actions.shape[1]
    assert traj.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert traj.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    P = traj.meta["prompt_length"]
    assert traj.states.shape == (B, P + T) and traj.log_probs.shape == (B, T) and traj.mask.shape == (B, T)
    assert torch.equal(traj.states[:, P:], traj.actions)
    # left padding: the shorter prompt's row starts with pads, attention 0 there
    p_ids, p_attn = policy.encode_prompts(PROMPTS)
    assert (p_attn[:, -1] == 1).all() and torch.equal(traj.cond["attention_mask"][:, :P], p_attn.repeat_interleave(3, 0))
    eos = set(policy.eos_token_ids)
    for i in range(B):
        n = int(traj.mask[i].sum())
        toks = traj.actions[i].tolist()
        assert traj.mask[i, :n].all() and not traj.mask[i, n:].any()  # 1 up to the end, 0 after
        assert not any(t in eos for t in toks[: n - 1])  # no EOS before the last kept token
        if bool(traj.meta["truncated"][i]):
            assert n == policy.max_new_tokens and toks[n - 1] not in eos
        else:
            assert toks[n - 1] in eos  # the EOS itself is trainable
            assert all(t == policy.pad_token_id for t in toks[n:])
        assert traj.outputs[i] == policy.tokenizer.decode(toks[:n], skip_special_tokens=True)
    assert traj.log_probs.dtype == torch.float32


def test_eos_masking_when_eos_is_frequent(tiny_lm_dir):
    # make most tokens end a completion, so the mask shows EOS handling on real rows
    torch.manual_seed(0)
    pol = TokenPolicy.from_pretrained(tiny_lm_dir, max_new_tokens=8)
    pol.eos_token_ids = list(range(7, 30))
    traj = pol.rollout(PROMPTS, group_size=4, generator=torch.Generator().manual_seed(1))
    lengths = traj.mask.sum(-1)
    assert (lengths < 8).any() and not traj.meta["truncated"][lengths < 8].any()
    for i in torch.nonzero(lengths < 8).flatten().tolist():
        n = int(lengths[i])
        assert int(traj.actions[i, n - 1]) in pol.eos_token_ids
        assert (traj.actions[i, n:] == pol.pad_token_id).all()


def test_same_seed_same_tokens(policy):
    a = policy.rollout(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(5))
    b = policy.rollout(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(5))
    c = policy.rollout(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.actions, b.actions) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.actions, c.actions)


def test_recompute_equals_rollout_ratio_one(policy):
    traj = policy.rollout(PROMPTS, group_size=3, generator=torch.Generator().manual_seed(0))
    ev = policy.evaluate(traj)
    m = traj.mask
    # stored old log-probs are the full-forward ones: the rollout stores this very call (same rows,
    # same shapes), so bit-identical wherever the kernels are deterministic for a fixed shape and
    # thread count (CPU, and CUDA without nondeterministic atomics): ratio exactly 1
    assert torch.equal(ev.log_prob.detach()[m], traj.log_probs[m])
    assert torch.exp(ev.log_prob.detach() - traj.log_probs)[m].sub(1).abs().max() == 0
    # the incremental (KV-cache) sampling log-probs agree to float precision
    torch.testing.assert_close(traj.meta["sampling_log_probs"][m], traj.log_probs[m], atol=1e-5, rtol=0)
    # a subset of steps and a subset of rows give the same numbers
    steps = torch.tensor([0, 2])
    assert torch.equal(policy.evaluate(traj, steps).log_prob.detach(), ev.log_prob.detach()[:, steps])
    sub = traj.select([1, 4])
    got, want = policy.evaluate(sub).log_prob.detach()[sub.mask], sub.log_probs[sub.mask]  # other rows: other batch shapes
    assert ((got - want).abs() <= _token_tol(policy, want)).all()


def test_entropy_and_temperature(tiny_lm_dir):
    pol = TokenPolicy.from_pretrained(tiny_lm_dir, max_new_tokens=4, temperature=0.7)
    traj = pol.rollout(PROMPTS[:1], group_size=2, generator=torch.Generator().manual_seed(0))
    ev = pol.evaluate(traj, entropy=True)
    assert pol.evaluate(traj).entropy is None  # entropies only when asked for (compute_entropy off)
    # by hand: log softmax(logits / 0.7) at the completion positions
    out = pol.model(input_ids=traj.states, attention_mask=traj.cond["attention_mask"], position_ids=traj.cond["position_ids"])
    P = traj.meta["prompt_length"]
    logp = torch.log_softmax(out.logits[:, P - 1 : -1].float() / 0.7, -1)
    torch.testing.assert_close(ev.log_prob, logp.gather(-1, traj.actions[..., None])[..., 0])
    torch.testing.assert_close(ev.entropy, -(logp.exp() * logp).sum(-1))


def test_reference_disables_lora(policy):
    traj = policy.rollout(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
        moved = policy.evaluate(traj).log_prob
        with policy.reference():
            ref = policy.evaluate(traj).log_prob
    m = traj.mask
    assert (moved - traj.log_probs)[m].abs().max() > 1e-3
    assert ((ref[m] - traj.log_probs[m]).abs() <= _token_tol(policy, traj.log_probs[m])).all()  # LoRA-B was 0 at rollout
    assert all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)


def test_full_finetune_reference_copy(tiny_lm_dir):
    pol = TokenPolicy.from_pretrained(tiny_lm_dir, max_new_tokens=3, reference_copy=True)
    traj = pol.rollout(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pol.model.lm_head.weight.add_(0.3)
        with pol.reference():
            ref = pol.evaluate(traj).log_prob
    torch.testing.assert_close(ref[traj.mask], traj.log_probs[traj.mask])


def test_top_p_filter_hand_values():
    # probs [0.5, 0.3, 0.15, 0.05]: mass before each = [0, .5, .8, .95]; top_p 0.8 keeps the first two
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_greedy_generate_is_deterministic(policy):
    a = policy.generate(PROMPTS)
    b = policy.generate(PROMPTS, generator=torch.Generator().manual_seed(3))
    assert a == b and len(a) == 2 and all(isinstance(x, str) for x in a)


def grpo_update(policy, traj, rewards, *, lr=0.5, spec=None):
    """One manual GRPO step: group advantages → policy_loss on all steps → SGD; returns the loss."""
    from flowrl.advantages import group_advantages

    adv = group_advantages(rewards, traj.group_ids, clip=None)
    spec = spec or LossSpec(ratio="token", clip="ppo_clip", clip_params={"clip_range": 0.2}, aggregation="seq-mean-token-mean")
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=lr)
    (steps,) = policy.step_chunks(traj)
    cur = policy.evaluate(traj, steps)
    inputs = LossInputs(
        log_prob=cur.log_prob, old_log_prob=traj.log_probs[:, steps], advantages=adv[:, None].expand(-1, len(steps)),
        mask=traj.mask[:, steps].float(), current=cur, traj=traj, steps=steps,
    )
    loss, metrics = policy_loss(inputs, spec)
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_manual_grpo_update_raises_rewarded_completions(policy):
    from flowrl.advantages import group_advantages

    traj = policy.rollout(PROMPTS, group_size=4, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, traj.group_ids, clip=None)
    m = traj.mask.float()
    before = (traj.log_probs * m).sum(-1) / m.sum(-1)
    loss0 = grpo_update(policy, traj, rewards)
    with torch.no_grad():
        after = (policy.evaluate(traj).log_prob * m).sum(-1) / m.sum(-1)
    delta = after - before
    # the surrogate −mean(A·mean_t ρ) fell: Σ A_i·Δ(mean log π_i) > 0 (first order: lr·|∇L|² > 0),
    # and on average rewarded completions gained likelihood relative to unrewarded ones
    assert float(loss0.detach()) == pytest.approx(0.0, abs=1e-6)  # on-policy, A sums to 0 in each group
    assert float((adv * delta).sum()) > 0
    assert delta[rewards == 1].mean() > delta[rewards == 0].mean()


def test_save_lora_round_trip(policy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    traj = policy.rollout(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(0))
    policy.save_lora(tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(policy.model.peft_config["default"].base_model_name_or_path)
    reloaded = TokenPolicy(PeftModel.from_pretrained(base, str(tmp_path / "lora")), policy.tokenizer, max_new_tokens=6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.evaluate(traj).log_prob[traj.mask], traj.log_probs[traj.mask], atol=1e-5, rtol=0)


def test_rollouts_of_different_widths_and_lengths_concatenate_with_ratio_one(policy):
    # DAPO's refill rounds produce rollouts with other prompt widths and completion lengths
    short = policy.rollout(["What is 2 + 3 ?"], group_size=2, generator=torch.Generator().manual_seed(0))
    policy.max_new_tokens = 3
    long_prompt = policy.rollout(["What is 2 + 3 + 4 + 5 + 6 ?"], group_size=2, generator=torch.Generator().manual_seed(1))
    assert short.meta["prompt_length"] != long_prompt.meta["prompt_length"] or short.num_steps != long_prompt.num_steps
    both = policy.concat_trajectories([short, long_prompt])
    assert len(both) == 4 and both.num_steps == max(short.num_steps, long_prompt.num_steps)
    recomputed = policy.log_prob(both)
    torch.testing.assert_close(recomputed[both.mask], both.log_probs[both.mask], rtol=0, atol=1e-5)
    assert both.outputs == short.outputs + long_prompt.outputs


U32 = 2.0**-24  # float32 unit roundoff


def _old_formula(pol, traj, temperature):
    """Today's reference: the whole model's logits, a full log-softmax, gather; entropy −Σ p log p.
    Returns (log-probs, entropies, a bound on the rounding of each logit)."""
    out = pol.model(input_ids=traj.states, attention_mask=traj.cond["attention_mask"], position_ids=traj.cond["position_ids"], output_hidden_states=True)
    P = traj.meta["prompt_length"]
    logits = out.logits[:, P - 1 : -1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    h = out.hidden_states[-1][:, P - 1 : -1].detach()
    W = pol.model.get_output_embeddings().weight.detach()
    H = h.shape[-1]
    # |fl(h·w) − h·w| ≤ γ_H Σ|h||w| for each logit, γ_H = H·u/(1 − H·u); two such products differ by twice that
    dot_bound = (H * U32 / (1 - H * U32)) * float((h.abs() @ W.abs().T).max()) / temperature
    return logp.gather(-1, traj.actions[..., None])[..., 0], -(logp.exp() * logp).sum(-1), dot_bound, logits


@pytest.mark.parametrize("chunk", [1 << 24, 3 * 7])  # one chunk; and a few positions per chunk
def test_chunked_chosen_log_probs_equal_full_log_softmax_within_rounding(tiny_lm_dir, chunk):
    # log p(a) = z[a] − logsumexp(z) over chunks of positions vs log_softmax(z)[a] of the whole logits
    torch.manual_seed(0)
    pol = TokenPolicy.from_pretrained(tiny_lm_dir, lora={"r": 4}, max_new_tokens=6, temperature=0.8, logit_chunk_elements=chunk)
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    traj = pol.rollout(PROMPTS, group_size=3, generator=torch.Generator().manual_seed(0))
    ev = pol.evaluate(traj, entropy=True)
    ref_lp, ref_ent, dot_bound, z = _old_formula(pol, traj, 0.8)
    scale = float(z.detach().abs().max()) + float(torch.logsumexp(z.detach(), -1).abs().max())
    V = z.shape[-1]
    # logit rounding enters z[a] and logsumexp once each (2 × 2·dot_bound); the two log-softmax forms
    # differ by a few roundings of numbers of size ≤ scale (8u·scale); entropy adds a V-term sum
    lp_tol = 4 * dot_bound + 8 * U32 * scale
    ent_tol = 4 * dot_bound + (8 + 2 * V) * U32 * scale
    m = traj.mask
    assert (ev.log_prob.detach() - ref_lp.detach())[m].abs().max() <= lp_tol
    assert (ev.entropy.detach() - ref_ent.detach())[m].abs().max() <= ent_tol
    # the gradient through the chunked, recomputed-in-backward output layer is the full one's
    w = torch.randn(ev.log_prob.shape, generator=torch.Generator().manual_seed(1)) * m
    params = [p for p in pol.model.parameters() if p.requires_grad]
    g_new = torch.autograd.grad((ev.log_prob * w).sum(), params)
    g_ref = torch.autograd.grad((ref_lp * w).sum(), params)
    for a, b in zip(g_new, g_ref):
        # same graph but the output layer's products; relative rounding bound γ over H·(layers + 2) terms
        tol = (32 * 4) * U32 * 64 * float(b.abs().max()) + 1e-12
        assert (a - b).abs().max() <= tol


def test_chosen_log_probs_hand_values():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    lp, ent = chosen_log_probs(logits, torch.tensor([[1]]), temperature=2.0, entropy=True)
    z = torch.tensor([1.0, 0.0, -0.5])
    p = torch.softmax(z, -1)
    assert float(lp) == pytest.approx(float(torch.log(p[1])), abs=1e-6)
    assert float(ent) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    assert chosen_log_probs(logits, torch.tensor([[0]]))[1] is None


def test_rollout_without_recompute_keeps_sampling_log_probs(policy):
    # the trainer's one-update mode: no second forward; the stored log-probs are the sampling ones
    a = policy.rollout(PROMPTS, group_size=3, generator=torch.Generator().manual_seed(0))
    policy.recompute_old_log_probs = False
    b = policy.rollout(PROMPTS, group_size=3, generator=torch.Generator().manual_seed(0))
    assert a.meta["old_log_probs"] == "recomputed" and b.meta["old_log_probs"] == "sampling"
    assert torch.equal(a.actions, b.actions)  # the same draws
    assert torch.equal(b.log_probs, b.meta["sampling_log_probs"])
    m = a.mask
    assert ((b.log_probs[m] - a.log_probs[m]).abs() <= _token_tol(policy, a.log_probs[m])).all()
    assert torch.equal(policy.old_log_probs(b)[m], a.log_probs[m]) and b.meta["old_log_probs"] == "recomputed"


def test_shared_prompt_pass_samples_what_one_pass_per_sample_samples(policy):
    # a group's prompt runs once and its KV cache is repeated G times: the same draws (per-prompt
    # streams) and log-probs as running the prompt once per sample
    from flowrl.seeding import PromptGenerators

    u_ids, u_attn = policy.encode_prompts(PROMPTS)
    shared = policy._sample(u_ids, u_attn, PromptGenerators(0, "t", keys=[0, 1]), repeats=3)
    per_row = policy._sample(u_ids.repeat_interleave(3, 0), u_attn.repeat_interleave(3, 0), PromptGenerators(0, "t", keys=[0, 1]))
    assert torch.equal(shared[0], per_row[0]) and torch.equal(shared[1], per_row[1])
    # the prompt pass in another batch shape: float32 rounding only
    assert ((shared[2] - per_row[2]).abs() <= _token_tol(policy, per_row[2])).all()


@pytest.mark.parametrize("checkpointing,attention", [(False, "sdpa"), (True, "sdpa"), (False, "eager")])
def test_prompt_computed_once_per_group_equals_one_row_per_sample(tiny_lm_dir, checkpointing, attention):
    # evaluate packs each distinct prompt with its completions into one sequence (each completion sees
    # the prompt and itself): the same log-probs and gradients as one row per sample, to rounding
    torch.manual_seed(0)
    pol = TokenPolicy.from_pretrained(tiny_lm_dir, lora={"r": 4}, max_new_tokens=6)
    pol.model.config._attn_implementation = attention  # sdpa takes a boolean mask, eager an additive one
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    traj = pol.rollout(PROMPTS + ["What is 2 + 3 + 4 ?"], group_size=3, generator=torch.Generator().manual_seed(2))
    traj = traj.select([4, 0, 7, 1, 3, 8, 2, 6, 5])  # groups interleaved, as a shuffled minibatch
    if checkpointing:
        from flowrl.builders import enable_gradient_checkpointing

        enable_gradient_checkpointing(pol.model)
        pol.model.train()
    packed_calls = []
    real = pol._shared_prompt_hidden
    pol._shared_prompt_hidden = lambda *a: packed_calls.append(real(*a) is not None) or real(*a)
    packed = pol.evaluate(traj).log_prob
    pol._shared_prompt_hidden = lambda *a: None
    per_row = pol.evaluate(traj).log_prob
    assert packed_calls == [True]  # the packed path ran
    m = traj.mask
    # measured: ≤ 1 ulp apart (2.4e-7 at |log p| ≈ 3.5) with 1 and 2 threads
    tol = 8 * U32 * float(per_row.detach().abs().max())
    assert (packed - per_row).detach()[m].abs().max() <= tol
    w = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1)) * m
    params = [p for p in pol.model.parameters() if p.requires_grad]
    g_packed = torch.autograd.grad((packed * w).sum(), params)
    g_row = torch.autograd.grad((per_row * w).sum(), params)
    for a, b in zip(g_packed, g_row):
        assert (a - b).abs().max() <= 1e-5 * float(b.abs().max()) + 1e-12  # measured 1.2e-6 relative (1 and 2 threads)


def _token_tol(policy, log_probs):
    from tests._tolerance import token_log_prob_tol

    c = policy.model.config
    return token_log_prob_tol(log_probs, hidden_size=c.hidden_size, vocab_size=c.vocab_size)
