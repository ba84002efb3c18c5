"""Precision, memory and run-directory rules of the training loop: gradient clipping acts on unscaled
gradients under fp16 loss scaling; a new run never starts in a used output_dir; text encoders can
wait on the CPU between encodings; reward models go on ``reward.device``."""

import copy
import json

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.config import ConfigError
from flowrl.trainer import Trainer
from tests._tolerance import float32_sum_tol


def _config(tmp_path, *extra):
    return TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=1", "sampler.num_steps=3",
        "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.train_batch_size=8",
        "train.progress=false", "sampler.eval_num_steps=3", "loss.beta=0", "train.max_grad_norm=1e-3", *extra,
    ])


def _policy(pipe, cfg):
    r = cfg.resolved()
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level,
                                    num_steps=cfg.sampler.num_steps, height=cfg.sampler.height, width=cfg.sampler.width)


def _fp16_scaling_accelerator():
    """An Accelerator that scales losses by 2^16 as fp16 training on a GPU does (accelerate gives
    the CPU no GradScaler; the scaling and unscaling logic is the same)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    acc.native_amp = True
    return acc


def test_fp16_loss_scaling_clips_and_logs_unscaled_gradients(tmp_path, tiny_sd3, monkeypatch):
    cfg32 = _config(tmp_path / "fp32")
    ref = Trainer(cfg32, policy=_policy(tiny_sd3, cfg32)).train().history[0]
    cfg16 = _config(tmp_path / "fp16")
    acc = _fp16_scaling_accelerator()
    try:
        trainer = Trainer(cfg16, policy=_policy(tiny_sd3, cfg16), accelerator=acc)
        # compute in float32 (CPU fp16 autocast is not the point): only the 2^16 loss scale differs
        monkeypatch.setattr(trainer, "autocast", lambda: torch.autocast("cpu", enabled=False))
        got = trainer.train().history[0]
        assert trainer.optimizer.scaler is not None and trainer.optimizer.scaler.get_scale() >= 2.0**15  # scaling was on
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # the gradient norm before clipping, unscaled: the fp32 run's (a scaled one would be ×65,536)
    assert ref["grad_norm"] > 1e-3  # so the clip at 1e-3 acts in both runs
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["loss/policy"] == pytest.approx(ref["loss/policy"], rel=1e-4, abs=1e-9)


def test_new_run_refuses_a_used_output_dir_and_resume_continues_it(tmp_path, tiny_sd3):
    cfg = _config(tmp_path, "train.iterations=2", "train.save_every=1", "train.save_total_limit=1")
    Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["iter_000002"]  # save_total_limit=1 deleted iter_000001
    with pytest.raises(ConfigError, match=r"train.output_dir=.*already holds checkpoints.*iter_000002.*resume_from=latest"):
        Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    # the refused run touched nothing: metrics of the first run are intact
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines if "reward/mean" in l] == [1, 2]
    more = _config(tmp_path, "train.iterations=3", "train.resume_from=latest")
    result = Trainer(more, policy=_policy(tiny_sd3, more)).train()
    assert [h["iteration"] for h in result.history] == [1, 2, 3]


# ------------------------------------------------------------------ memory: text encoders, rewards
class _Moves:
    """Records every ``Module.to`` device of the watched modules, in order."""

    def __init__(self, modules, monkeypatch):
        self.ids, self.calls = {id(m) for m in modules}, []
        real = torch.nn.Module.to

        def to(module, *args, **kwargs):
            if id(module) in self.ids:
                self.calls.append(str(torch.device(args[0] if args else kwargs["device"])))
            return real(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)


def test_offloaded_text_encoders_go_to_the_device_only_to_encode_new_prompts(tmp_path, tiny_sd3, monkeypatch):
    cfg = _config(tmp_path)
    plain, off = (FlowPolicy.from_pipeline(copy.deepcopy(tiny_sd3), num_steps=2, height=16, width=16, guidance_scale=4.5) for _ in range(2))
    adapter = off.adapter
    encoders = adapter._text_encoders()
    assert len(encoders) == 3  # CLIP-L, CLIP-G, T5
    moves = _Moves(encoders, monkeypatch)
    adapter.offload_text_encoders("cpu")
    assert moves.calls == ["cpu"] * 3 and adapter.text_encoder_moves == ["cpu"]
    device = str(adapter.device)  # the training device (the CPU here: the order of moves is the check)
    where = []
    real_encode = adapter.encode_texts
    monkeypatch.setattr(adapter, "encode_texts", lambda texts: (where.append(list(moves.calls[-3:])), real_encode(texts))[1])

    def rollout(policy, prompts):
        return policy.rollout(prompts, group_size=2, generator=torch.Generator().manual_seed(0))

    prompts = ["a cat", "a dog"]
    a, b = rollout(plain, prompts), rollout(off, prompts)
    # three strings (2 prompts + the negative ""), each encoded alone, all while the encoders sat
    # on the training device; afterwards they are back on the offload device
    assert adapter.text_encoder_calls == 3 and where == [[device] * 3] * 3
    assert adapter.text_encoder_moves == ["cpu", device, "cpu"] and moves.calls[-3:] == ["cpu"] * 3
    for x, y in ((a.log_probs, b.log_probs), (a.outputs, b.outputs), (a.states, b.states)):
        # the same numbers as resident encoders: the same computation on the same device (offload
        # only moves the weights), bit-identical for a fixed machine and thread count
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    # every string cached: the encoders stay where they are (no move, no call)
    n = len(moves.calls)
    rollout(off, prompts)
    assert len(moves.calls) == n and adapter.text_encoder_calls == 3
    # a new prompt: one round trip for it alone
    rollout(off, ["a cat", "a bird"])
    assert adapter.text_encoder_calls == 4 and adapter.text_encoder_moves[-2:] == [device, "cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (training device ≠ offload device)")
def test_offloaded_text_encoders_leave_the_gpu(tmp_path, tiny_sd3):
    cfg = _config(tmp_path)
    policy = _policy(tiny_sd3, cfg)
    policy.adapter.pipe.to("cuda")
    policy.adapter.offload_text_encoders("cpu")
    policy.rollout(["a cat"], group_size=2, generator=torch.Generator().manual_seed(0))
    assert {p.device.type for m in policy.adapter._text_encoders() for p in m.parameters()} == {"cpu"}
    assert policy.adapter.device.type == "cuda"


def test_offload_text_encoders_from_the_config(tmp_path):
    from flowrl.builders import build_policy

    cfg = _config(tmp_path, "model.pipeline=digits", "model.device=cpu", "model.offload_text_encoders=true")
    policy = build_policy(cfg.resolved(), tmp_path / "run")
    assert policy.adapter.text_encoder_offload == torch.device("cpu") and policy.adapter.text_encoder_moves == ["cpu"]
    llm = TrainConfig.from_dict({"model": {"pipeline": "tiny-llama", "kind": "causal_lm", "offload_text_encoders": True}, "algorithm": "grpo"})
    with pytest.raises(ConfigError, match="model.offload_text_encoders"):
        build_policy(llm.resolved(), tmp_path / "llm")


class DeviceProbe:
    """A reward that only records the device it was built for."""

    name = "probe"

    def __init__(self, *, device="cpu"):
        self.device = device

    def __call__(self, outputs, prompts, meta=None):
        return torch.zeros(len(prompts))


def test_reward_device_is_the_default_device_of_reward_models(tmp_path):
    from flowrl.builders import _build_reward_set

    def device_of(*sets, process_device=None, options=1.0):
        cfg = TrainConfig().override([f"train.output_dir={tmp_path}", *sets])
        cfg.reward.rewards = {"tests.test_scale_knobs:DeviceProbe": options}
        return next(iter(_build_reward_set(cfg, process_device=process_device).rewards.values())).device

    assert device_of() == "cpu"  # unset: the reward's own default
    assert device_of("reward.device=meta") == torch.device("meta")
    assert device_of("reward.device=auto", process_device=torch.device("meta")) == torch.device("meta")  # this process's device
    assert device_of("reward.device=meta", options={"weight": 1.0, "device": "cpu"}) == "cpu"  # the reward's own option wins
    with pytest.raises(ConfigError, match="reward.device"):
        device_of("reward.device=nonsense")


# ------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_is_non_reentrant_on_diffusion_models(tiny_sd3, monkeypatch):
    """The reentrant form breaks DDP (find_unused_parameters): every checkpointed block must be
    called with use_reentrant=False, and the gradients equal the plain model's."""
    import torch.utils.checkpoint as tuc

    from flowrl.builders import enable_gradient_checkpointing

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda fn, *a, **kw: (calls.append(kw.get("use_reentrant")), real(fn, *a, **kw))[1])
    grads = []
    for ckpt in (False, True):
        policy = FlowPolicy.from_pipeline(copy.deepcopy(tiny_sd3), num_steps=2, height=16, width=16)
        if ckpt:
            enable_gradient_checkpointing(policy.model)
        traj = policy.rollout(["a cat"], group_size=2, generator=torch.Generator().manual_seed(0))
        policy.model.train()
        policy.evaluate(traj, torch.arange(traj.num_steps)).log_prob.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None]))
    assert calls and set(calls) == {False}  # one call per transformer block, all non-reentrant
    # the forward recomputed in the same shapes (measured identical); bound for near-zero entries:
    # each is a float32 sum over ≤ 4096 rows × tokens × features of terms ≤ the largest entry
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=float32_sum_tol(float(grads[0].abs().max()), 4096))


def test_gradient_checkpointing_applies_to_language_models(tmp_path):
    """train.gradient_checkpointing on a causal LM (it was ignored there): on, same gradients."""
    from tests._dist_worker import llm_config  # the repository root is on the path (pyproject: pythonpath)

    from flowrl.builders import build_policy

    grads = []
    for ckpt in (False, True):
        cfg = llm_config("grpo", [f"train.gradient_checkpointing={str(ckpt).lower()}", f"train.output_dir={tmp_path / str(ckpt)}"])
        policy = build_policy(cfg.resolved(), tmp_path / str(ckpt))
        assert policy.model.is_gradient_checkpointing is ckpt
        traj = policy.rollout(["What is 1 + 2 ?"], group_size=2, generator=torch.Generator().manual_seed(0))
        policy.model.train()
        (policy.log_prob(traj) * traj.mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=float32_sum_tol(float(grads[0].abs().max()), 4096))
