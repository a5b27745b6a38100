"""Prompt + verbalizer classification (MeZO-style): the prediction is the label whose verbalizer word
is most likely after the prompt, the training loss is the LM loss of the correct word.

    score(x, c)   = sum_i log p(w_c[i] | prompt(x), w_c[:i])       (multi-token words: summed log-probs)
    lm loss       = mean_x  -score(x, y_x)                          (full-vocabulary cross-entropy)
    ce loss       = mean_x  -log softmax_c(score(x, c))[y_x]        (over the candidates: MeZO's
                                                                     train_as_classification loss)
    accuracy loss = 1 - mean_x [argmax_c score(x, c) == y_x]        (non-differentiable; fine for ZO)

Logits are computed only at the positions that predict a verbalizer token: the decoder's hidden
states are gathered there and only those rows go through lm_head (never a tokens x vocab matrix).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import Example
from .errors import ZOError

DEFAULT_TEMPLATE = "Tweet: {text}\nSentiment (positive or negative):"
DEFAULT_VERBALIZER = {"positive": " positive", "negative": " negative"}


@dataclass
class PromptTask:
    """template: a str with one `{text}` field; verbalizer: label -> word (the word's tokens follow the
    prompt, so it usually starts with a space); max_text_tokens: the text is cut to this many tokens."""
    template: str = DEFAULT_TEMPLATE
    verbalizer: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_VERBALIZER))
    max_text_tokens: int = 64

    def __post_init__(self):
        if self.template.count("{text}") != 1:
            raise ZOError(f"--template must contain {{text}} exactly once, got {self.template!r}")
        if len(self.verbalizer) < 2:
            raise ZOError("a verbalizer needs at least two labels")
        if self.max_text_tokens < 1:
            raise ZOError("max_text_tokens must be >= 1")

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)


class VerbalizerCollator:
    """Turns a list of Examples (or {'text', 'label'} dicts) into one scoring batch:

    input_ids, attention_mask [R, T] (right padded); target_row, target_pos, target_token, target_cand [N]:
    the logit row (r, pos) scores token `target_token` for candidate `target_cand` (= example * C + c);
    label [E] (index of the correct candidate). If every verbalizer word is one token, R = E (one row per
    example, all candidates read at its last position); otherwise R = E * C (prompt + word per row)."""

    def __init__(self, tokenizer, task: PromptTask):
        self.tokenizer, self.task = tokenizer, task
        prefix, suffix = task.template.split("{text}")
        self.prefix_ids = tokenizer(prefix, add_special_tokens=True).input_ids if prefix else \
            tokenizer("", add_special_tokens=True).input_ids
        self.suffix_ids = tokenizer(suffix, add_special_tokens=False).input_ids
        self.word_ids = [tokenizer(w, add_special_tokens=False).input_ids for w in task.verbalizer.values()]
        for lab, ids in zip(task.verbalizer, self.word_ids):
            if not ids:
                raise ZOError(f"verbalizer word for label {lab!r} is empty after tokenization")
        self.label_index = {lab: i for i, lab in enumerate(task.verbalizer)}
        self.single_token = all(len(ids) == 1 for ids in self.word_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def prompt_ids(self, text: str) -> list[int]:
        text_ids = self.tokenizer(text, add_special_tokens=False).input_ids[:self.task.max_text_tokens]
        return self.prefix_ids + text_ids + self.suffix_ids

    def __call__(self, features: Sequence) -> dict[str, torch.Tensor]:
        rows, t_row, t_pos, t_tok, t_cand, labels = [], [], [], [], [], []
        n_cand = len(self.word_ids)
        for e, ex in enumerate(features):
            text, label = (ex.text, ex.label) if isinstance(ex, Example) else (ex["text"], ex["label"])
            if label not in self.label_index:
                raise ZOError(f"label {label!r} has no verbalizer word (labels: {', '.join(self.label_index)})")
            labels.append(self.label_index[label])
            prompt = self.prompt_ids(text)
            if self.single_token:
                r = len(rows)
                rows.append(prompt)
                for c, ids in enumerate(self.word_ids):
                    t_row.append(r), t_pos.append(len(prompt) - 1), t_tok.append(ids[0]), t_cand.append(e * n_cand + c)
            else:
                for c, ids in enumerate(self.word_ids):
                    r = len(rows)
                    rows.append(prompt + ids)
                    for i, tok in enumerate(ids):
                        t_row.append(r), t_pos.append(len(prompt) - 1 + i), t_tok.append(tok)
                        t_cand.append(e * n_cand + c)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return {"input_ids": input_ids, "attention_mask": mask, "target_row": as_long(t_row),
                "target_pos": as_long(t_pos), "target_token": as_long(t_tok), "target_cand": as_long(t_cand),
                "label": as_long(labels)}


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, object]:
    """(decoder, lm_head, config) of a causal LM, looking through PEFT (LoRA) and DDP/compile wrappers."""
    m = model
    for attr in ("module", "_orig_mod"):
        while hasattr(m, attr) and isinstance(getattr(m, attr), nn.Module) and not hasattr(m, "get_decoder"):
            m = getattr(m, attr)
    if hasattr(m, "get_base_model") and hasattr(m, "peft_config"):
        m = m.get_base_model()
    decoder = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", None)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is m:
        raise ZOError(f"{type(m).__name__} is not a decoder + lm_head causal LM; label-position scoring "
                      "needs one (use objective='lm' with a standard loss instead)")
    return decoder, head, m.config


class FrozenTrunkCache:
    """Pre-final-norm hidden states at label positions, computed once per (prompt row, position).

    Valid only while every parameter before the decoder's final norm is frozen (tune='final-norm'):
    then h = trunk(x) never changes, and a probe's logits lm_head(norm(h)) need only the final norm
    and lm_head on N rows — the same value a full forward gives, without the 30 decoder layers.
    Rows are keyed by their unpadded token ids (right padding does not reach earlier positions)."""

    def __init__(self, model: nn.Module):
        decoder, _, _ = causal_lm_parts(model)
        self.norm = getattr(decoder, "norm", None)
        if not isinstance(self.norm, nn.Module):
            raise ZOError(f"{type(decoder).__name__} has no final `norm` module; the trunk cache needs one")
        before = [n for n, p in decoder.named_parameters() if p.requires_grad and not n.startswith("norm.")]
        if before:
            raise ZOError(f"the trunk cache needs a frozen trunk, but {len(before)} parameters before the final "
                          f"norm are trainable (e.g. {before[0]})")
        self.store: dict[tuple[bytes, int], torch.Tensor] = {}
        self.decoder = decoder

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(input_ids)
        row_keys = [input_ids[r, :lengths[r]].cpu().numpy().tobytes() for r in range(len(input_ids))]
        keys = [(row_keys[r], p) for r, p in zip(rows.tolist(), positions.tolist())]
        missing = sorted({r for r, k in zip(rows.tolist(), keys) if k not in self.store})
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            captured = {}
            handle = self.norm.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
            try:
                with torch.no_grad():
                    self.decoder(input_ids=input_ids[idx], attention_mask=None if attention_mask is None
                                 else attention_mask[idx], use_cache=False)
            finally:
                handle.remove()
            where = {r: i for i, r in enumerate(missing)}
            for r, p, k in zip(rows.tolist(), positions.tolist(), keys):
                if k not in self.store and r in where:
                    self.store[k] = captured["h"][where[r], p].detach().clone()
        return torch.stack([self.store[k] for k in keys])

    def label_hidden(self, input_ids, attention_mask, rows, positions) -> torch.Tensor:
        """norm(cached pre-norm state) at (rows[n], positions[n]) — the rows lm_head scores."""
        return self.norm(self.hidden(input_ids, attention_mask, rows, positions))


def _right_padded_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Unpadded length of each row; refuses masks that are not 1...1 0...0 (right padding)."""
    if attention_mask is None:
        return [input_ids.shape[1]] * input_ids.shape[0]
    lengths = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        raise ZOError("the layer-input cache needs right-padded rows (attention_mask 1...1 0...0); "
                      "set tokenizer.padding_side = 'right'")
    return lengths.tolist()


class LayerInputCache:
    """Hidden states at the input of decoder layer `first_layer`, computed once per prompt row.

    Valid while the embeddings and decoder layers 0 .. first_layer-1 stay unchanged (only the later
    layers, the final norm or lm_head are tuned). With right padding and causal attention a real
    token's state does not depend on the pads, so each row is stored for its unpadded positions,
    keyed by its unpadded token ids. `decoder_output(input_ids, attention_mask)` then runs the
    decoder with layers 0 .. first_layer-1 skipped: the decoder's own embedding, rotary and mask
    code still runs, layers 0 .. first_layer-2 return their input and layer first_layer-1 returns
    the cached states of the batch, so only layers first_layer.. + the final norm do work.

    Attach it as `model.zo_trunk_cache` and `label_position_logits` / `candidate_scores` use it.
    The first fill checks the skipping forward against the full one (ZOError if the decoder does
    not call its `layers` in order, once each, with the hidden states as first argument)."""

    def __init__(self, model: nn.Module, first_layer: int, *, verify: bool = True, rtol: float = 1e-4,
                 atol: float = 1e-4):
        decoder, _, _ = causal_lm_parts(model)
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ZOError(f"{type(decoder).__name__} has no `layers` ModuleList of decoder layers; the "
                          "layer-input cache needs one")
        if not 1 <= first_layer <= len(layers):
            raise ZOError(f"first_layer must be in [1, {len(layers)}] (the decoder has {len(layers)} layers), "
                          f"got {first_layer}")
        frozen_ids = {id(p) for i in range(first_layer) for p in layers[i].parameters()}
        for name, mod in decoder.named_children():
            if name not in ("layers", "norm"):
                frozen_ids |= {id(p) for p in mod.parameters()}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in frozen_ids]
        if trainable:
            raise ZOError(f"the layer-input cache needs the embeddings and layers 0..{first_layer - 1} frozen, "
                          f"but {len(trainable)} of their parameters are trainable (e.g. {trainable[0]})")
        self.decoder, self.layers, self.first_layer = decoder, layers, first_layer
        self.store: dict[bytes, torch.Tensor] = {}
        self.verify, self.rtol, self.atol = verify, rtol, atol
        self._returns_tuple: bool | None = None
        self._verified = False

    def __len__(self) -> int:
        return len(self.store)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def _full_forward(self, input_ids, attention_mask, capture: dict):
        """Full decoder forward that records the input of layer first_layer (and the layers' return type)."""
        def pre(module, args, kwargs):
            capture["h"] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, output):
            capture["tuple"] = isinstance(output, tuple)

        handles = [self.layers[self.first_layer].register_forward_pre_hook(pre, with_kwargs=True)
                   if self.first_layer < len(self.layers) else
                   getattr(self.decoder, "norm").register_forward_pre_hook(lambda m, a: capture.update(h=a[0])),
                   self.layers[self.first_layer - 1].register_forward_hook(post)]
        try:
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _skipping(self, states: torch.Tensor):
        wrap = (lambda h: (h,)) if self._returns_tuple else (lambda h: h)

        def passthrough(*args, **kwargs):
            return wrap(args[0] if args else kwargs["hidden_states"])

        def inject(*args, **kwargs):
            return wrap(states)

        for i in range(self.first_layer):
            self.layers[i].forward = inject if i == self.first_layer - 1 else passthrough
        try:
            yield
        finally:
            for i in range(self.first_layer):
                del self.layers[i].forward

    def decoder_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """The decoder's output (last_hidden_state after the final norm) for this batch, computing only
        layers first_layer.. for rows already cached."""
        lengths = _right_padded_lengths(input_ids, attention_mask)
        keys = [input_ids[r, :n].cpu().numpy().tobytes() for r, n in enumerate(lengths)]
        missing = sorted({keys[r]: r for r in range(len(keys)) if keys[r] not in self.store}.values())
        full_out = None
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            capture: dict = {}
            with torch.no_grad():
                out = self._full_forward(input_ids[idx], None if attention_mask is None else attention_mask[idx],
                                         capture)
            self._returns_tuple = capture["tuple"]
            for i, r in enumerate(missing):
                self.store[keys[r]] = capture["h"][i, :lengths[r]].detach().clone()
            if len(missing) == len(keys):
                full_out = out
        # the full forward ran under no_grad: it stands in only where no gradient is wanted
        if full_out is not None and (self._verified or not self.verify) and not torch.is_grad_enabled():
            return full_out
        ref = self.store[keys[0]]
        states = torch.zeros(*input_ids.shape, ref.shape[-1], dtype=ref.dtype, device=ref.device)
        for r, n in enumerate(lengths):
            states[r, :n] = self.store[keys[r]]
        with self._skipping(states):
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if full_out is not None:  # first fill: the skipping forward must reproduce the full one
            self._check(full_out, out, lengths)
        return out

    def _check(self, full_out, out, lengths) -> None:
        a, b = _last_hidden(full_out), _last_hidden(out)
        ok = a.shape == b.shape and all(torch.allclose(a[r, :n].float(), b[r, :n].float(), rtol=self.rtol,
                                                       atol=self.atol) for r, n in enumerate(lengths))
        if not ok:
            raise ZOError(f"{type(self.decoder).__name__}: the forward with layers 0..{self.first_layer - 1} "
                          "skipped does not reproduce the full forward; this decoder's structure does not fit "
                          "the layer-input cache (use --cache-trunk no)")
        self._verified = True

    def label_hidden(self, input_ids, attention_mask, rows, positions) -> torch.Tensor:
        """Final-norm hidden states at (rows[n], positions[n]) — the rows lm_head scores."""
        return _last_hidden(self.decoder_output(input_ids, attention_mask))[rows, positions]


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def label_position_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits[n] = lm_head(h[rows[n], positions[n]]) — [N, vocab], float32; the decoder runs with
    use_cache=False and only N hidden states reach lm_head. With a FrozenTrunkCache or LayerInputCache
    attached as `model.zo_trunk_cache`, h comes from its `label_hidden` (cached frozen states)."""
    decoder, head, config = causal_lm_parts(model)
    cache = getattr(model, "zo_trunk_cache", None)
    if cache is not None:
        logits = head(cache.label_hidden(input_ids, attention_mask, rows, positions)).float()
    else:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = head(_last_hidden(out)[rows, positions]).float()
    cap = getattr(getattr(config, "get_text_config", lambda: config)(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def candidate_scores(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[E, C] summed log-probabilities of each candidate's verbalizer tokens."""
    logits = label_position_logits(model, batch["input_ids"], batch.get("attention_mask"),
                                   batch["target_row"], batch["target_pos"])
    logp = torch.log_softmax(logits, dim=-1).gather(1, batch["target_token"][:, None])[:, 0]
    n_examples = batch["label"].numel()
    n_cand = int(batch["target_cand"].max()) // n_examples + 1  # every example has every candidate
    scores = torch.zeros(n_examples * n_cand, dtype=torch.float32, device=logp.device)
    scores.index_add_(0, batch["target_cand"], logp)
    return scores.view(n_examples, -1)


class VerbalizerObjective:
    """The minimized scalar of a scoring batch: kind='lm' (mean NLL of the correct verbalizer word),
    'ce' (cross-entropy over the candidates' scores) or 'accuracy' (1 - accuracy). `predict` gives
    (scores [E, C], labels [E]) for evaluation."""

    KINDS = ("lm", "ce", "accuracy")

    def __init__(self, kind: str = "lm"):
        if kind not in self.KINDS:
            raise ZOError(f"objective must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.kind = kind

    def predict(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return candidate_scores(model, batch), batch["label"]

    def loss_from_scores(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "lm":
            return -scores.gather(1, labels[:, None]).mean()
        if self.kind == "ce":
            return torch.nn.functional.cross_entropy(scores, labels)
        return 1.0 - (scores.argmax(dim=1) == labels).float().mean()

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        return self.loss_from_scores(*self.predict(model, batch))

    def __repr__(self) -> str:
        return f"VerbalizerObjective({self.kind!r})"


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, collator: VerbalizerCollator, examples: Sequence[Example],
                      batch_size: int = 16, device=None, progress: str | None = None) -> tuple[float, list[bool]]:
    """Accuracy and the per-example correctness (for McNemar), model in eval mode, no autograd. `progress`:
    the description of a tqdm bar over the examples (None: no bar)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    correct: list[bool] = []
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(examples), desc=progress, unit="ex", leave=False)
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[i:i + batch_size]).items()}
            scores = candidate_scores(model, batch)
            correct.extend((scores.argmax(1) == batch["label"]).tolist())
            if bar is not None:
                bar.update(len(scores))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return (sum(correct) / len(correct) if correct else float("nan")), correct
