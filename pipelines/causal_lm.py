""":class:`TokenPolicy`: a transformers causal LM behind the same :class:`~flowrl.policy.Policy`
protocol as the diffusion policies.

A completion of ``T`` tokens is a trajectory of ``T`` steps whose per-step log-prob is
``log softmax(logits / temperature)[token]`` (float32). Everything downstream — advantage
estimators, ratio levels, clip rules, aggregation — is shared with the flow policies
(docs/algorithms.md, "Language models").

Layout of a rollout (``B = len(prompts) · group_size``, groups contiguous):

- prompts are chat-templated (if the tokenizer has a template and ``chat_template=True``) and
  **left**-padded to a common length ``P``;
- ``states`` ``[B, P + T]``: prompt ids then completion ids (pad after EOS);
- ``actions`` ``[B, T]``: completion ids; ``log_probs`` ``[B, T]``; ``mask`` ``[B, T]`` bool, true up
  to and including EOS;
- ``cond["attention_mask"]`` ``[B, P + T]`` and ``cond["position_ids"]`` ``[B, P + T]``: exactly what
  :meth:`TokenPolicy.evaluate` feeds the model, so re-evaluation reproduces the stored log-probs.

Old log-probs: with ``recompute_old_log_probs`` (the default) they are recomputed with one full
forward pass after sampling (as verl does), so with unchanged weights ``evaluate`` returns them bit
for bit (ratio 1). Without it (the trainer's choice when one update uses each batch once, as TRL
does with ``num_iterations=1``) the stored log-probs are the incremental-decoding ones and
``meta["old_log_probs"]`` is ``"sampling"``; they agree with a recomputation to float precision. The
incremental-decoding log-probs are always kept in ``meta["sampling_log_probs"]``.

Only the chosen tokens' log-probs are computed, ``log p(a_t) = z_t[a_t] − logsumexp(z_t)`` with
``z = logits / temperature``, a few sequence positions at a time (``logit_chunk_elements``), so no
``[B, T, V]`` float32 log-softmax is held; the entropy only when asked for.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor

from flowrl.policy import PolicyBase, PolicyEval, Trajectories
from flowrl.seeding import multinomial

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set logits outside the smallest set whose probability mass reaches ``top_p`` to −inf.

    ``[N, V] → [N, V]``. The most likely token is always kept (Holtzman et al. 2020, nucleus sampling).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # mass strictly before each token; a token is dropped once the mass before it reaches top_p
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def chosen_log_probs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, *, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-prob of the chosen tokens (and optionally the entropy) without a full log-softmax.

    ``logits [..., V]``, ``tokens [...]`` → ``[...]`` float32 each. With ``z = logits / temperature``
    (float32): ``log p(a) = z[a] − logsumexp(z)`` and ``H = logsumexp(z) − Σ_v softmax(z)_v · z_v``
    (= −Σ p log p). Equal to ``log_softmax(z).gather(a)`` up to float32 rounding.
    """
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, tokens[..., None])[..., 0] - lse
    ent = (lse - (torch.softmax(z, dim=-1) * z).sum(-1)) if entropy else None
    return lp, ent


def _cache_of(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _lora_config(lora: Any) -> Any:
    """``True`` / rank ``int`` / dict of ``LoraConfig`` fields / a ``LoraConfig`` → ``LoraConfig``."""
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if lora is True:
        lora = {}
    if isinstance(lora, int):
        lora = {"r": lora}
    if not isinstance(lora, dict):
        raise TypeError(f"lora must be True, a rank (int), a dict of LoraConfig fields or a LoraConfig; got {lora!r}.")
    kw = {"r": 8, "lora_alpha": None, "lora_dropout": 0.0, "target_modules": list(DEFAULT_LORA_TARGETS), "task_type": "CAUSAL_LM"}
    kw.update(lora)
    if kw["lora_alpha"] is None:
        kw["lora_alpha"] = 2 * kw["r"]
    return LoraConfig(**kw)


class TokenPolicy(PolicyBase):
    """A causal LM as a :class:`~flowrl.policy.Policy` over tokens.

    Args:
        model: a transformers causal LM (optionally a peft ``PeftModel``). It is the trainable
            module (``self.model``); with LoRA adapters, :meth:`reference` disables them.
        tokenizer: its tokenizer; ``pad_token`` defaults to ``eos_token`` when missing.
        max_new_tokens: completion budget ``T``; a completion without EOS is truncated
            (``meta["truncated"]``) and all its tokens stay trainable.
        temperature: sampling temperature; log-probs are ``log softmax(logits / temperature)``.
        top_p: nucleus sampling mass (1.0: off). Filtering only changes *which* token is drawn; the
            stored log-prob is from the unfiltered tempered distribution, as in TRL and verl.
        chat_template: wrap each prompt as one user turn with the tokenizer's chat template (if it
            has one) and ``add_generation_prompt=True``.
        system_prompt: optional system turn prepended when the chat template is used.
        eos_token_ids: ids ending a completion (default: tokenizer EOS + generation-config EOS).
        micro_batch_size: rows per forward pass in :meth:`evaluate` and sampling (None: all).
        logit_chunk_elements: most logits (rows × positions × vocabulary) :meth:`evaluate` holds at
            once; the output layer runs over that many positions at a time (recomputed in the backward
            pass, so the training pass holds no ``[B, T, V]`` logits either).

    Attributes the trainer sets: ``recompute_old_log_probs`` (see the module docstring) and
    ``compute_entropy`` (whether :meth:`evaluate` returns per-token entropies; off unless a loss
    reads them).
    """

    #: recompute the stored log-probs with one full forward pass after sampling (bit-equal to evaluate)
    recompute_old_log_probs: bool = True
    #: return per-token entropies from evaluate (costs a softmax over the vocabulary per token)
    compute_entropy: bool = False

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        chat_template: bool = True,
        system_prompt: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        micro_batch_size: int | None = None,
        logit_chunk_elements: int = 1 << 24,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens}).")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use a small value such as 1e-3 for near-greedy decoding.")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {top_p}).")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.micro_batch_size = micro_batch_size
        self.logit_chunk_elements = int(logit_chunk_elements)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id = int(tokenizer.pad_token_id)
        if eos_token_ids is None:
            ids: set[int] = set()
            if tokenizer.eos_token_id is not None:
                ids.add(int(tokenizer.eos_token_id))
            gen = getattr(model, "generation_config", None)
            gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
            if gen_eos is not None:
                ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
            eos_token_ids = sorted(ids)
        if not eos_token_ids:
            raise ValueError("no EOS token id: pass eos_token_ids=[...] so completions can end.")
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        # dropout would make re-evaluation differ from rollout: keep the module in eval mode
        self.model.eval()

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        gguf_file: str | None = None,
        lora: Any = None,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        reference_copy: bool = False,
        tokenizer_path: str | None = None,
        **policy_kwargs: Any,
    ) -> "TokenPolicy":
        """Load a causal LM and tokenizer from a local directory (or a GGUF file inside it).

        ``lora``: None (full fine-tune), True, a rank, a dict of ``LoraConfig`` fields (default
        r 8, α 2r, dropout 0, q/k/v/o projections) or a ``LoraConfig``. ``reference_copy``: for a
        full fine-tune, keep a frozen copy as the KL reference (LoRA needs none: adapters are
        disabled). ``gguf_file``: a GGUF checkpoint name in ``path`` (needs ``pip install gguf``;
        transformers de-quantises it to ``torch_dtype``).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw: dict[str, Any] = {"dtype": torch_dtype}
        if gguf_file is not None:
            kw["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(path, **kw).to(device)
        tok_kw = {"gguf_file": gguf_file} if (gguf_file is not None and tokenizer_path is None) else {}
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, **tok_kw)
        reference = None
        if lora is not None and lora is not False:
            from peft import get_peft_model

            model = get_peft_model(model, _lora_config(lora))
        elif reference_copy:
            reference = copy.deepcopy(model)
        policy = cls(model, tokenizer, **policy_kwargs)
        if reference is not None:
            policy.set_reference_model(reference)
        return policy

    def check_config(self, resolved: Any) -> None:
        """Stop with a :class:`~flowrl.config.ConfigError` if this policy, given to the trainer ready-made,
        disagrees with the config it trains under: ``sampler.max_new_tokens`` (TRL's
        ``max_completion_length``; also Dr.GRPO's constant normaliser) and ``sampler.temperature`` (the
        temperature of the stored log-probs) must be the policy's."""
        from flowrl.errors import ConfigError

        s = resolved.config.sampler
        if int(s.max_new_tokens) != self.max_new_tokens:
            raise ConfigError(
                f"sampler.max_new_tokens is {s.max_new_tokens} but the given policy generates up to {self.max_new_tokens} "
                f"tokens: set sampler.max_new_tokens={self.max_new_tokens} (it is also Dr.GRPO's constant normaliser)."
            )
        if float(s.temperature) != self.temperature:
            raise ConfigError(
                f"sampler.temperature is {s.temperature} but the given policy samples at {self.temperature}: "
                f"set sampler.temperature={self.temperature}."
            )

    def reference(self) -> ContextManager[None]:
        """The frozen reference policy: a peft model's adapters disabled (``disable_adapter()``), or
        the frozen copy set with :meth:`set_reference_model` (``reference_copy=True``)."""
        if getattr(self, "_reference_model", None) is None and hasattr(self.model, "disable_adapter") and getattr(self.model, "peft_config", None):
            return self.model.disable_adapter()
        return super().reference()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------ prompts
    def format_prompt(self, prompt: str) -> str:
        """The text fed to the model for ``prompt`` (chat template applied if configured)."""
        if self.chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and attention mask, each ``[N, P]`` long."""
        templated = self.chat_template and getattr(self.tokenizer, "chat_template", None)
        rows = []
        for p in prompts:
            ids = self.tokenizer(self.format_prompt(p), add_special_tokens=not templated)["input_ids"]
            if len(ids) == 0:
                raise ValueError(f"prompt {p!r} tokenises to nothing.")
            rows.append(list(ids))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attn[i, width - len(r):] = 1
        return ids, attn

    # ------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], *, group_size: int, generator: torch.Generator | None = None) -> Trajectories:
        """Sample ``group_size`` completions per prompt (groups contiguous) → :class:`Trajectories`.

        Sampling uses ``generator`` only (``torch.multinomial``), so the same seed gives the same
        tokens on the same device. See the module docstring for the stored fields.
        """
        if group_size < 1:
            raise ValueError(f"group_size (num_generations) must be >= 1 (got {group_size}).")
        prompts = list(prompts)
        device = self.device
        # 1. encode and repeat each prompt G times
        u_ids, u_attn = (x.to(device) for x in self.encode_prompts(prompts))  # [N, P] distinct prompts
        p_ids = u_ids.repeat_interleave(group_size, 0)  # [B, P]
        p_attn = u_attn.repeat_interleave(group_size, 0)  # [B, P]
        rows = p_ids.shape[0]
        mb = self.micro_batch_size or rows
        # 2. sample (micro-batches of rows; each continues the same generator stream, or, with
        # per-prompt streams, micro-batches hold whole groups and use their prompts' streams).
        # Micro-batches of whole groups run each prompt's pass once and share its KV cache.
        from flowrl.seeding import PromptGenerators

        G = group_size
        if isinstance(generator, PromptGenerators):
            mb = max(G, mb // G * G)
            parts = [self._sample(u_ids[s // G : (s + mb) // G], u_attn[s // G : (s + mb) // G], generator.narrow(s // G, (s + mb) // G), repeats=G) for s in range(0, rows, mb)]
        elif mb % G == 0:
            parts = [self._sample(u_ids[s // G : (s + mb) // G], u_attn[s // G : (s + mb) // G], generator, repeats=G) for s in range(0, rows, mb)]
        else:
            parts = [self._sample(p_ids[s : s + mb], p_attn[s : s + mb], generator) for s in range(0, rows, mb)]
        width = max(a.shape[1] for a, _, _ in parts)
        actions = torch.full((rows, width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((rows, width), dtype=torch.bool, device=device)
        sample_lp = torch.zeros((rows, width), dtype=torch.float32, device=device)
        for (a, m, lp), s in zip(parts, range(0, rows, mb)):
            actions[s : s + a.shape[0], : a.shape[1]] = a
            mask[s : s + a.shape[0], : a.shape[1]] = m
            sample_lp[s : s + a.shape[0], : a.shape[1]] = lp
        # 3. assemble the stored trajectory; old log-probs from one full forward (ratio exactly 1)
        # unless the caller takes the sampling ones (recompute_old_log_probs = False)
        eos = torch.tensor(self.eos_token_ids, device=device)
        ended = (torch.isin(actions, eos) & mask).any(-1)
        attn = torch.cat([p_attn, mask.long()], dim=1)  # [B, P + T]
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        # completion positions continue after the prompt even where masked (pads after EOS)
        prompt_len = p_ids.shape[1]
        positions[:, prompt_len:] = positions[:, prompt_len - 1 : prompt_len] + torch.arange(1, width + 1, device=device)
        lengths = mask.sum(-1)
        outputs = [self.tokenizer.decode(actions[i, : int(lengths[i])].tolist(), skip_special_tokens=True) for i in range(rows)]
        traj = Trajectories(
            prompts=[p for p in prompts for _ in range(group_size)],
            group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
            log_probs=sample_lp,
            mask=mask,
            states=torch.cat([p_ids, actions], dim=1),
            actions=actions,
            outputs=outputs,
            cond={"attention_mask": attn, "position_ids": positions},
            meta={
                "prompt_length": prompt_len,
                "completion_length": lengths.cpu(),
                "truncated": (~ended).cpu(),
                "sampling_log_probs": sample_lp,
                "temperature": self.temperature,
                "segment_ids": self.segment_ids(actions, mask).cpu(),
                "old_log_probs": "sampling",
            },
        )
        if self.recompute_old_log_probs:
            traj.log_probs = self.old_log_probs(traj)
        return traj

    @torch.no_grad()
    def old_log_probs(self, traj: Trajectories) -> Tensor:
        """Recompute ``traj``'s stored log-probs with one full forward pass (no gradient) and mark
        ``meta["old_log_probs"] = "recomputed"``; with unchanged weights :meth:`evaluate` then returns
        them bit for bit (ratio exactly 1)."""
        lp = self.evaluate(traj, entropy=False).log_prob.detach()
        traj.meta["old_log_probs"] = "recomputed"
        return lp

    def _forward(self, ids: Tensor, attn: Tensor, positions: Tensor, **kw: Any) -> Any:
        return self.model(input_ids=ids, attention_mask=attn, position_ids=positions, **kw)

    def _sample(self, p_ids: Tensor, p_attn: Tensor, generator: torch.Generator | None, *, greedy: bool = False,
                max_new_tokens: int | None = None, repeats: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """Incremental decoding with a KV cache (``greedy``: argmax instead of sampling).
        ``repeats``: each prompt row is sampled that many times (rows ``i·repeats …``, groups
        contiguous); its prompt pass runs once and the KV cache is repeated. Returns
        ``(tokens, mask, log_probs)`` each ``[n · repeats, t]``.

        The prompt pass computes the output layer for the last position only; each step draws from
        ``softmax(z)`` (``z = logits / temperature``, nucleus-filtered for the draw only) with the
        given generator and records ``z[a] − logsumexp(z)``."""
        device = p_ids.device
        budget = max_new_tokens or self.max_new_tokens
        eos = torch.tensor(self.eos_token_ids, device=device)
        positions = (p_attn.cumsum(-1) - 1).clamp(min=0)
        prompt_len = p_attn.shape[1]
        out = self._forward(p_ids, p_attn, positions, use_cache=True, logits_to_keep=1)
        cache = _cache_of(out)
        logits = out.logits[:, -1]
        if repeats > 1:
            if hasattr(cache, "batch_repeat_interleave"):  # one prompt pass per group, its cache shared
                cache.batch_repeat_interleave(repeats)
                logits = logits.repeat_interleave(repeats, 0)
                p_attn, positions = p_attn.repeat_interleave(repeats, 0), positions.repeat_interleave(repeats, 0)
            else:  # a cache without batch repetition: one prompt pass per sample
                p_ids, p_attn, positions = (x.repeat_interleave(repeats, 0) for x in (p_ids, p_attn, positions))
                out = self._forward(p_ids, p_attn, positions, use_cache=True, logits_to_keep=1)
                cache, logits = _cache_of(out), out.logits[:, -1]
        n = p_attn.shape[0]
        # the attention mask of every step, filled once (fed tokens are always attended: positions
        # after EOS are masked later)
        attn = torch.cat([p_attn, torch.ones((n, budget), dtype=p_attn.dtype, device=device)], dim=1)
        last_pos = positions[:, -1:]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        pad = torch.full((n,), self.pad_token_id, dtype=torch.long, device=device)
        tokens, masks, lps = [], [], []
        for step in range(budget):
            # 1. tempered logits (float32); nucleus filtering only changes which token is drawn
            z = logits.float() / self.temperature  # [n, V]
            if greedy:
                tok = z.argmax(-1)
            else:
                probs = torch.softmax(top_p_filter(z, self.top_p), dim=-1)
                tok = multinomial(probs, 1, generator).to(device)[:, 0]
            lp = z.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
            tok = torch.where(done, pad, tok)
            tokens.append(tok)
            masks.append(~done)
            lps.append(lp.masked_fill(done, 0.0))
            done = done | torch.isin(tok, eos)
            if step == budget - 1 or bool(done.all()):
                break
            # 2. feed the token back
            last_pos = last_pos + 1
            out = self._forward(tok[:, None], attn[:, : prompt_len + step + 1], last_pos, cache=cache, use_cache=True)
            cache = _cache_of(out)
            logits = out.logits[:, -1]
        return torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(lps, 1)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, generator: torch.Generator | None = None, greedy: bool = True, max_new_tokens: int | None = None) -> list[str]:
        """One completion per prompt as text (greedy by default: deterministic evaluation)."""
        p_ids, p_attn = self.encode_prompts(list(prompts))
        p_ids, p_attn = p_ids.to(self.device), p_attn.to(self.device)
        mb = self.micro_batch_size or len(prompts)
        outputs: list[str] = []
        for s in range(0, len(prompts), mb):
            toks, mask, _ = self._sample(p_ids[s : s + mb], p_attn[s : s + mb], generator, greedy=greedy, max_new_tokens=max_new_tokens)
            outputs += [self.tokenizer.decode(toks[i, : int(mask[i].sum())].tolist(), skip_special_tokens=True) for i in range(toks.shape[0])]
        return outputs

    def segment_ids(self, actions: Tensor, mask: Tensor) -> Tensor:
        """``[B, T]`` sub-sentence index of each completion token (SSPO): a new segment starts after
        a token whose text contains sentence punctuation (``. ! ? ; :`` or a newline)."""
        ids = torch.unique(actions[mask.bool()]).tolist()
        ends = {i for i in ids if any(c in self.tokenizer.decode([i]) for c in ".!?;:\n")}
        boundary = torch.zeros_like(actions, dtype=torch.long)
        for i in ends:
            boundary |= (actions == i).long()
        boundary = boundary * mask.long()
        return torch.cumsum(boundary, dim=1) - boundary

    # ----------------------------------------------------------------------------- evaluate
    def evaluate(self, traj: Trajectories, steps: Tensor | None = None, *, entropy: bool | None = None) -> PolicyEval:
        """Per-token log-prob (and entropy) of the stored completions under the current weights.

        ``[B, T']`` each (``T'`` = ``len(steps)`` or ``T``), float32, ``log p(a_t) = z_t[a_t] −
        logsumexp(z_t)`` with ``z = logits / temperature`` (:func:`chosen_log_probs`). Uses the stored
        left padding, attention mask and position ids, so with unchanged weights it reproduces
        ``traj.log_probs`` exactly when they were recomputed. ``entropy``: also return per-token
        entropies (default: ``compute_entropy``; else ``PolicyEval.entropy`` is None). Gradients flow
        unless called under ``no_grad``.
        """
        want_entropy = self.compute_entropy if entropy is None else bool(entropy)
        ids = traj.states.to(self.device)
        attn = traj.cond["attention_mask"].to(self.device)
        positions = traj.cond["position_ids"].to(self.device)
        T = traj.actions.shape[1]
        actions = traj.actions.to(self.device)
        temperature = float(traj.meta.get("temperature", self.temperature))
        rows = ids.shape[0]
        mb = self.micro_batch_size or rows
        lps, ents = [], []
        for s in range(0, rows, mb):
            lp, ent = self._chosen(ids[s : s + mb], attn[s : s + mb], positions[s : s + mb], actions[s : s + mb], temperature, want_entropy)
            lps.append(lp)
            ents.append(ent)
        log_prob = torch.cat(lps, 0)
        ent_all = torch.cat(ents, 0) if want_entropy else None
        if steps is not None:
            steps = torch.as_tensor(steps, device=log_prob.device)
            log_prob = log_prob[:, steps]
            ent_all = ent_all[:, steps] if ent_all is not None else None
        return PolicyEval(log_prob=log_prob, entropy=ent_all)

    def _split_head(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """``(decoder, output layer)`` when the model's logits are exactly ``output_layer(decoder
        hidden states)`` (a plain transformers causal LM, LoRA or not), else None (a module wrapped
        for DDP or sharded with FSDP, or a model that rescales or soft-caps its logits): then the whole
        model is called and its logits are reduced in chunks."""
        model = self.model
        get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
        if get_dec is None or get_head is None or isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return None
        from flowrl.sharding import fsdp_modules

        if fsdp_modules(model):  # FSDP gathers the root's weights (embeddings, head) in the whole model's forward only
            return None
        config = getattr(model, "config", None)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
            v = getattr(config, name, None)
            if v not in (None, 1, 1.0):
                return None
        try:
            decoder, head = get_dec(), get_head()
        except (AttributeError, NotImplementedError, ValueError):
            return None
        if decoder is None or decoder is model or not isinstance(head, torch.nn.Module):
            return None
        return decoder, head

    def _shared_prompt_hidden(self, decoder: torch.nn.Module, ids: Tensor, attn: Tensor, positions: Tensor, T: int) -> Tensor | None:
        """Hidden states ``[b, T, H]`` of the positions that predict the completions, with each
        distinct prompt run once: per prompt one packed sequence ``[prompt, completion_1, …,
        completion_k]`` whose attention mask lets each completion see the prompt and itself
        (causally), with the stored position ids. The same attention as one row per sample, so the
        same numbers up to float rounding, with the prompt computed once per group instead of G times.
        None (the caller runs one row per sample) when no prompt repeats, when the model's attention
        does not take a custom mask (only ``sdpa`` and ``eager`` do), or when the packed attention
        (dense over ``P + k·T`` positions) would cost over twice the per-row one (long completions)."""
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        b, L = ids.shape
        P = L - T
        if impl not in ("sdpa", "eager") or P < 1 or b < 2:
            return None
        prompt_key = torch.cat([ids[:, :P] * attn[:, :P], attn[:, :P]], dim=1)
        uniq, inverse = torch.unique(prompt_key, dim=0, return_inverse=True)
        g = uniq.shape[0]
        if g == b:
            return None
        device = ids.device
        counts = torch.bincount(inverse, minlength=g)
        k_max = int(counts.max())
        width = P + k_max * T
        if g * width * width > 2 * b * L * L:
            # the packed attention scores (dense, g·width²) would cost over twice the rows' (b·L²):
            # long completions, where the prompt is a small share anyway
            return None
        # slot of each row inside its prompt's packed sequence (rows in their order)
        order = torch.argsort(inverse, stable=True)
        slot = torch.empty(b, dtype=torch.long, device=device)
        starts = torch.cumsum(counts, 0) - counts
        slot[order] = torch.arange(b, device=device) - starts[inverse[order]]
        first = torch.full((g,), b, dtype=torch.long, device=device).scatter_reduce(0, inverse, torch.arange(b, device=device), reduce="amin")
        pad_id = self.pad_token_id
        p_ids = torch.full((g, width), pad_id, dtype=ids.dtype, device=device)
        p_pos = torch.zeros((g, width), dtype=positions.dtype, device=device)
        valid = torch.zeros((g, width), dtype=torch.bool, device=device)
        segment = torch.full((g, width), -1, dtype=torch.long, device=device)  # -1: prompt, j: completion slot j
        p_ids[:, :P], p_pos[:, :P], valid[:, :P] = ids[first, :P], positions[first, :P], attn[first, :P].bool()
        cols = P + slot[:, None] * T + torch.arange(T, device=device)[None, :]  # [b, T]
        rows_g = inverse[:, None].expand(-1, T)
        p_ids[rows_g, cols], p_pos[rows_g, cols] = ids[:, P:], positions[:, P:]
        valid[rows_g, cols] = attn[:, P:].bool()
        segment[rows_g, cols] = slot[:, None].expand(-1, T)
        # key k visible to query q: k valid, k ≤ q, and k in the prompt or in q's own completion; every
        # query sees itself (a padded query would otherwise see nothing: NaN in the softmax)
        idx = torch.arange(width, device=device)
        causal = idx[None, :] <= idx[:, None]
        same = (segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None])
        allowed = (causal[None] & same & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
        if impl == "sdpa":  # a boolean mask (True: attend) suits any query dtype (autocast included)
            mask = allowed[:, None]
        else:  # eager attention adds the mask to its scores
            dtype = next(decoder.parameters()).dtype
            mask = torch.zeros((g, 1, width, width), dtype=dtype, device=device).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
        hidden = decoder(input_ids=p_ids, attention_mask=mask, position_ids=p_pos).last_hidden_state  # [g, width, H]
        # position predicting completion token t: the prompt's last position for t = 0, else the row's token t − 1
        src_cols = torch.cat([torch.full((b, 1), P - 1, dtype=torch.long, device=device), cols[:, :-1]], dim=1)
        return hidden[inverse[:, None].expand(-1, T), src_cols]

    def _chosen(self, ids: Tensor, attn: Tensor, positions: Tensor, actions: Tensor, temperature: float, want_entropy: bool) -> tuple[Tensor, Tensor | None]:
        """Chosen-token log-probs (and entropies) ``[b, T]`` of one micro-batch, the output layer
        run over ``logit_chunk_elements / (b · V)`` positions at a time."""
        b, T = actions.shape
        split = self._split_head()
        if split is None:
            # the whole model (its own logit post-processing); positions P−1 … P+T−2 predict the T tokens
            logits = self._forward(ids, attn, positions, logits_to_keep=T + 1).logits[:, :-1]
            head, source = None, logits
        else:
            decoder, head = split
            source = self._shared_prompt_hidden(decoder, ids, attn, positions, T)
            if source is None:
                hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=positions).last_hidden_state
                source = hidden[:, -(T + 1) : -1]
        vocab = int(head.out_features if isinstance(head, torch.nn.Linear) else getattr(getattr(self.model, "config", None), "vocab_size", 0) or source.shape[-1])
        step = max(1, self.logit_chunk_elements // max(1, b * vocab))
        checkpoint = head is not None and torch.is_grad_enabled() and source.requires_grad

        def piece(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
            logits = head(x) if head is not None else x
            lp, ent = chosen_log_probs(logits, a, temperature, entropy=want_entropy)
            return lp, (ent if ent is not None else lp.new_zeros(()))

        lps, ents = [], []
        for s in range(0, T, step):
            x, a = source[:, s : s + step], actions[:, s : s + step]
            if checkpoint:  # the chunk's logits are recomputed in the backward pass, not kept
                from torch.utils.checkpoint import checkpoint as ckpt

                lp, ent = ckpt(piece, x, a, use_reentrant=False)
            else:
                lp, ent = piece(x, a)
            lps.append(lp)
            ents.append(ent)
        return torch.cat(lps, 1), (torch.cat(ents, 1) if want_entropy else None)

    def concat_trajectories(self, parts: Sequence[Trajectories]) -> Trajectories:
        """Stack rollouts of different prompt widths ``P`` and completion lengths ``T`` (DAPO's refill
        rounds): prompts are left-padded to the widest, completions right-padded to the longest
        with masked pad tokens, so every row keeps its completion in the last ``T`` positions and
        recomputed log-probs of its real tokens are unchanged."""
        widths = {int(p.meta["prompt_length"]) for p in parts}
        lengths = {int(p.actions.shape[1]) for p in parts}
        if len(widths) == 1 and len(lengths) == 1:
            return Trajectories.concat(parts)
        P, T = max(widths), max(lengths)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        fixed = []
        for tr in parts:
            p, t, b = int(tr.meta["prompt_length"]), int(tr.actions.shape[1]), len(tr)
            lp, rp = P - p, T - t

            def pad2(x: Tensor, left: int, right: int, value: Any) -> Tensor:
                return torch.nn.functional.pad(x, (left, right), value=value)

            meta = dict(tr.meta)
            meta["prompt_length"] = P
            for key in ("sampling_log_probs", "segment_ids"):
                if isinstance(meta.get(key), Tensor) and meta[key].dim() == 2:
                    meta[key] = pad2(meta[key], 0, rp, 0)
            cond = dict(tr.cond)
            cond["attention_mask"] = pad2(tr.cond["attention_mask"], lp, rp, 0)
            cond["position_ids"] = pad2(tr.cond["position_ids"], lp, rp, 0)
            fixed.append(dataclasses.replace(
                tr,
                states=pad2(tr.states, lp, rp, pad_id),
                actions=pad2(tr.actions, 0, rp, pad_id),
                log_probs=pad2(tr.log_probs, 0, rp, 0.0),
                mask=pad2(tr.mask, 0, rp, False),
                advantages=pad2(tr.advantages, 0, rp, 0.0) if tr.advantages is not None and tr.advantages.dim() == 2 else tr.advantages,
                cond=cond,
                meta=meta,
            ))
            del b
        return Trajectories.concat(fixed)

    # ------------------------------------------------------------------------------ saving
    def save_pretrained(self, path: str) -> None:
        """Save the model (LoRA adapters only, for a peft model) and the tokenizer to ``path``."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def save_lora(self, path: Any, state_dict: dict[str, Any] | None = None) -> None:
        """Save the LoRA adapters (peft format: ``PeftModel.from_pretrained(base, path)`` loads them).
        ``state_dict``: weights by parameter name to save instead of the module's own (FSDP)."""
        if not getattr(self.model, "peft_config", None):
            raise RuntimeError("this policy has no LoRA adapters to save; use save_pretrained for a full fine-tune.")
        if state_dict is None:
            self.model.save_pretrained(str(path))
        else:
            self.model.save_pretrained(str(path), state_dict=state_dict)

    def load_lora(self, path: Any) -> None:
        """Load a LoRA folder saved by :meth:`save_lora` (a run's ``lora/``, peft format) into this
        policy's adapters, which must have the same rank and targets (a policy built from the run's
        config has them). ``flowrl eval/sample/gallery --run`` use it for language-model runs."""
        from peft import load_peft_weights, set_peft_model_state_dict

        if not getattr(self.model, "peft_config", None):
            raise ValueError("this policy has no LoRA adapters to load into; build it with lora={...} (train.lora_rank > 0).")
        weights = load_peft_weights(str(path), device="cpu")
        result = set_peft_model_state_dict(self.model, weights)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise ValueError(f"LoRA folder {path} holds weights this model lacks (e.g. {unexpected[0]}); was it saved from another model or LoRA setup?")


def build_causal_lm_policy(resolved: Any, run_dir: Any) -> TokenPolicy:
    """The trainer's builder for ``model.kind: causal_lm``: load ``model.pipeline`` (a local folder,
    or ``tiny-llama`` for the offline test model), add LoRA from ``train.lora_*`` (peft), and pass
    the sampler's ``max_new_tokens`` / ``temperature``.

    Dr.GRPO's constant normaliser (``max_len = max_new_tokens``) is part of the resolved config
    (``flowrl.algorithms.resolve``), so it holds for a policy built here or given to the trainer.
    """
    from pathlib import Path

    import flowrl.rewards.verifiers  # noqa: F401  (registers exact_match / format / length_penalty)

    cfg = resolved.config
    t, s = cfg.train, cfg.sampler
    path = cfg.model.pipeline
    if path == "tiny-llama":
        path = build_tiny_causal_lm(str(Path(run_dir) / "base_model"))
    else:  # a local folder or a Hugging Face id in the local cache (nothing is downloaded)
        from flowrl.pipelines.sources import local_model_folder

        path = str(local_model_folder(path, builtins=("tiny-llama",)))
    lora = None
    if t.lora_rank > 0:
        lora = {"r": t.lora_rank, "lora_alpha": t.lora_alpha, "target_modules": list(t.lora_targets or DEFAULT_LORA_TARGETS)}
    device = cfg.model.device if cfg.model.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(t.seed)
    policy = TokenPolicy.from_pretrained(
        path, gguf_file=cfg.model.gguf_file, lora=lora, torch_dtype=getattr(torch, cfg.model.dtype), device=device,
        max_new_tokens=s.max_new_tokens, temperature=s.temperature,
    )
    if t.gradient_checkpointing:
        from flowrl.devices import enable_gradient_checkpointing

        enable_gradient_checkpointing(policy.model)
    return policy


try:  # register the builder (absent in a checkout without flowrl.plugins)
    from flowrl.plugins import POLICY_BUILDERS

    if "causal_lm" not in POLICY_BUILDERS:
        POLICY_BUILDERS.register("causal_lm", build_causal_lm_policy)
except ImportError:  # pragma: no cover
    pass


# ------------------------------------------------------------------------- tiny offline model
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_causal_lm(path: str, *, words: Sequence[str] = (), seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> str:
    """Save a tiny random ``LlamaForCausalLM`` and a word-level tokenizer (with a chat template)
    to ``path`` and return it — an offline stand-in for a real checkpoint in tests and demos.

    The vocabulary holds special tokens, chat role tokens, digits, ``+ - * = ?``, answer tags and
    ``words``; text is split on whitespace and punctuation.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    base = [str(d) for d in range(10)] + list("+-*/=?.,:()") + ["<answer>", "</answer>", "What", "is", "Answer", "the", "\\boxed{", "}"]
    vocab: dict[str, int] = {}
    for w in specials + base + list(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


__all__ = ["TokenPolicy", "top_p_filter", "build_tiny_causal_lm", "build_causal_lm_policy", "TINY_CHAT_TEMPLATE"]
