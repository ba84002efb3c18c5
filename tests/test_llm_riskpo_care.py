"""RiskPO and GRPO-CARE against their formulas (written out here the way the papers' released code
computes them, loop by loop)."""

from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)

from flowrl.advantages import AdvantageInputs, RiskPOAdvantage, care_bonus, grpo_care_estimator, mixed_var_advantage, riskpo_papers  # noqa: E402
from flowrl.care import GRPOCareObjective, answer_confidence, answer_span_mask  # noqa: E402


def _riskpo_reference(rewards, group_ids, bundle_size, alpha, beta, w, credit, eps=1e-6):
    """RiskPO's released advantage (quantile mode 'batch'), written with plain loops."""
    groups = list(dict.fromkeys(group_ids.tolist()))
    adv = torch.zeros(len(rewards))
    for start in range(0, len(groups), bundle_size):
        bundle = groups[start : start + bundle_size]
        answers = [[i for i in range(len(rewards)) if group_ids[i] == g] for g in bundle]
        n_papers = min(len(a) for a in answers)
        papers = [[a[j] for a in answers] for j in range(n_papers)]
        scores = torch.tensor([sum(float(rewards[i]) for i in p) for p in papers])
        if n_papers == 1:
            qa = qb = scores[0]
            std = torch.tensor(1.0)
        else:
            qa, qb = torch.quantile(scores, alpha), torch.quantile(scores, beta)
            std = torch.std(scores)
        for p, x in zip(papers, scores):
            rvar = (torch.clamp(x - qa, min=0) - torch.clamp(x - qb, min=0) + qa - qb) / (beta - alpha + eps)
            cvar = -torch.clamp(qa - x, min=0) / (alpha + eps)
            a = (w * cvar + rvar) / (w + 1) / (std + eps)
            for i in p:
                if credit == "std":
                    q = rewards[group_ids == group_ids[i]]
                    s = torch.std(q)
                    a_i = a / ((s if s > 1e-3 else 1.0) + eps)
                else:
                    a_i = a
                adv[i] = a_i
    return adv


def test_riskpo_advantage_matches_the_released_formula():
    g = torch.Generator().manual_seed(0)
    group_ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 3 + [3] * 4 + [4] * 4)  # group 2 has 3 answers
    rewards = torch.randint(0, 2, (len(group_ids),), generator=g).float()
    rewards[:4] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # a question with σ = 0 counts σ as 1
    for credit in ("std", "uniform"):
        est = RiskPOAdvantage(bundle_size=3, credit=credit)
        ours = est(AdvantageInputs(rewards=rewards, group_ids=group_ids))
        ref = _riskpo_reference(rewards, group_ids, 3, 0.2, 0.9, 1.5, credit)
        torch.testing.assert_close(ours, ref)
    # bundle 0 = questions 0, 1, 2 → 3 papers; the 4th answers of questions 0 and 1 are in no paper
    bundle, paper = riskpo_papers(group_ids, 3)
    assert paper[3] == -1 and paper[7] == -1 and ours[3] == 0 and ours[7] == 0
    assert bundle.tolist() == [0] * 11 + [1] * 8
    assert (ours <= 0).all()  # both risk parts are ≤ 0: the lower tail is pushed down, the top left alone


def test_mixed_var_pieces():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    a = mixed_var_advantage(x, 1.0, 3.0, alpha=0.2, beta=0.9, weight=1.5, eps=0.0)
    rvar = torch.tensor([-2.0, -2.0, -1.0, 0.0, 0.0]) / 0.7
    cvar = torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0]) / 0.2
    torch.testing.assert_close(a, (1.5 * cvar + rvar) / 2.5)
    assert torch.equal(mixed_var_advantage(torch.full((4,), 2.0), 2.0, 2.0, alpha=0.2, beta=0.9, weight=1.5), torch.zeros(4))


def test_riskpo_tracked_quantiles_move_by_the_pinball_gradient():
    group_ids = torch.arange(5).repeat_interleave(2)
    r1 = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0, 1, 1]).float()
    est = RiskPOAdvantage(bundle_size=5, quantiles="tracked", lr_q=0.1)
    first = est(AdvantageInputs(rewards=r1, group_ids=group_ids))
    torch.testing.assert_close(first, RiskPOAdvantage(bundle_size=5)(AdvantageInputs(rewards=r1, group_ids=group_ids)))
    scores = torch.tensor([r1[0::2].sum(), r1[1::2].sum()])  # papers: first and second answers
    q0 = torch.quantile(scores, torch.tensor([0.2, 0.9]))
    torch.testing.assert_close(est.tracked, q0)
    est(AdvantageInputs(rewards=r1, group_ids=group_ids))
    below = torch.stack([(scores < q0[0]).float().mean(), (scores < q0[1]).float().mean()])
    torch.testing.assert_close(est.tracked, q0 + 0.1 * (torch.tensor([0.2, 0.9]) - below))
    clone = RiskPOAdvantage(bundle_size=5, quantiles="tracked")
    clone.load_state_dict(est.state_dict())
    torch.testing.assert_close(clone.tracked, est.tracked)


def test_care_bonus_matches_the_released_rule():
    acc = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.05, 0.0])
    conf = torch.tensor([0.9, 0.5, 0.95, 0.6, 0.9, 0.9, 0.9, 0.9])
    gid = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    b = care_bonus(acc, conf, gid, bonus=0.5, margin=0.01)
    # group 0: accurate = {0, 1, 3} (acc > 0.1 and ≥ mean 0.75); their mean confidence 2/3 → 0.9 ≥ 0.657
    # gets the bonus, 0.5 and 0.6 do not; group 1: nobody above 0.1 → no bonus
    assert b.tolist() == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    meta = {"care_confidence": conf}
    inputs = AdvantageInputs(rewards=acc, group_ids=gid, reward_table=acc[:, None], reward_names=["acc"], meta=meta)
    adv = grpo_care_estimator(inputs)
    r = acc + b
    ref = torch.cat([(x - x.mean()) / (x.std() + 1e-4) for x in r.view(2, 4)])
    torch.testing.assert_close(adv, ref)


def test_answer_span_and_confidence():
    texts = [["I", "think", "<answer>", "4", "2", "</answer>", "<eos>"], ["no", "tag", "<eos>"]]
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]]).bool()
    span = answer_span_mask(texts, mask)
    assert span[0].tolist() == [False, False, False, True, True, False, False]
    assert span[1].tolist() == [True, True, False, False, False, False, False]
    lp = torch.log(torch.tensor([[0.5] * 7, [0.2] * 7]))
    conf = answer_confidence(lp, span, upper_bound=0.95)
    torch.testing.assert_close(conf, torch.tensor([0.5, 0.2]), rtol=1e-5, atol=0)  # exp(mean of 2 equal logs; span count +1e-6): ≤ 4e-7 relative
    assert float(answer_confidence(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))) == pytest.approx(0.95)


def test_care_reference_is_an_ema_updated_every_n_steps():
    p = torch.nn.Parameter(torch.zeros(3))
    trainer = SimpleNamespace(policy=SimpleNamespace(trainable_parameters=lambda: [p]))
    obj = GRPOCareObjective(decay=0.9, update_every=2)
    obj._params(trainer.policy)  # the reference starts at the initial weights
    with torch.no_grad():
        p.fill_(1.0)
    obj.on_update(trainer)
    assert obj.shadow[0].tolist() == [0.0] * 3  # 1 step of 2: unchanged
    obj.on_update(trainer)
    torch.testing.assert_close(obj.shadow[0], torch.full((3,), 0.1))
    state = obj.state_dict()
    other = GRPOCareObjective(decay=0.9, update_every=2)
    other.load_state_dict(state)
    torch.testing.assert_close(other.shadow[0], obj.shadow[0])
    assert other.updates == 2


def test_care_estimator_with_a_failed_reward_uses_the_valid_rows_confidences():
    """A sample whose reward failed (NaN, within reward.max_failures) is left out of the estimator,
    and so is its entry of the per-sample meta the estimator reads (``care_confidence``)."""
    from flowrl.advantages import make_estimator
    from flowrl.estimation import run_estimator

    rewards = torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    conf = torch.tensor([0.9, 0.2, 0.5, 0.8, 0.1, 0.3])
    table = rewards[:, None].clone()
    meta = {"care_confidence": conf}
    adv = run_estimator(make_estimator("grpo_care"), AdvantageInputs(rewards=rewards, group_ids=groups, reward_table=table, reward_names=["acc"], meta=meta))
    keep = torch.tensor([0, 1, 3, 4, 5])
    expected = grpo_care_estimator(AdvantageInputs(rewards=rewards[keep], group_ids=groups[keep], reward_table=table[keep], reward_names=["acc"],
                                                   meta={"care_confidence": conf[keep]}))
    assert adv[2] == 0 and torch.allclose(adv[keep], expected)
    assert meta["care_confidence"] is conf and len(meta["care_bonus"]) == 5  # the caller's entry untouched; the bonus of the valid rows


def _byte_level_bpe(tmp_path):
    """A byte-level BPE (Qwen2/GPT-2 style: ByteLevel pre-tokenizer and decoder) trained offline on a
    tiny corpus without answer tags, so ``<answer>`` splits into several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["I think the answer is 42.", "Let me reason: 6 times 7 is 42.", "so the result <is> >< here"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")


def test_answer_span_on_a_byte_level_bpe_tag_split_over_tokens(tmp_path):
    """The tags are matched on the joined text: with a byte-level BPE ``<answer>`` is several tokens
    (matching one token that contains the tag falls back to every token but the last)."""
    tok = _byte_level_bpe(tmp_path)
    completion = "I think <answer> 42</answer>"
    ids = tok(completion)["input_ids"] + [tok.eos_token_id]
    texts = [tok.decode([t]) for t in ids]
    assert not any("<answer>" in t for t in texts) and len(texts) > 6  # the tag is split
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    span = answer_span_mask([texts], mask)
    answer = tok.decode([t for t, s in zip(ids, span[0].tolist()) if s])
    assert answer.strip() == "42"
    assert 0 < int(span.sum()) < len(ids) - 4
    # no closing tag: up to the completion's end (the end-of-sequence token's text included)
    open_ids = tok("so <answer> 42")["input_ids"]
    span = answer_span_mask([[tok.decode([t]) for t in open_ids]], torch.ones(1, len(open_ids), dtype=torch.bool))
    assert tok.decode([t for t, s in zip(open_ids, span[0].tolist()) if s]).strip() == "42"
