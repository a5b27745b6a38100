"""Task-adaptive pretraining (TAPT; Gururangan et al. 2020), here through whatever `--tune` selects (bottleneck
adapters in the paper this follows): continued causal-LM training on the task's own unlabeled text before
fine-tuning, with ZO (ZOTrainer) or first-order AdamW (FOTrainer) as the baseline.

    L_LM(theta) = -(1 / N) sum_{rows r} sum_{t < len_r - 1} log p_theta(x_{r,t+1} | x_{r,<=t})   (N: the terms)

Text: the task corpus with its labels dropped, never a dev or test text (matched by text, so duplicates of a
held-out tweet are out too): the fine-tuning train texts first, then the rest of the pool in a seeded order, to
--tapt-examples. Held-out LM loss and perplexity exp(L_LM) are measured on the dev split's texts before and
after TAPT. Fine-tuning then continues from the TAPT weights (the same adapters: stacking fresh ones would
change the trainable-parameter count that the comparison with direct fine-tuning holds fixed).

Recipe with ZOTrainer (what `python -m zokernels finetune --tapt-steps N` does):

    texts = unlabeled_texts(corpus, held_out=dev + test, first=train, n=1000, seed=0)
    ZOTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False), train_dataset=texts,
              data_collator=TextLMCollator(tokenizer, max_tokens=48), objective=CausalLMObjective(),
              zo_seed=tapt_seed(0)).train()
    # then the usual fine-tuning ZOTrainer on the labeled data, on the same model
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import ZOError
from .scoring import label_position_logits

from .tuning import TAPT_LOG_FILE  # noqa: F401  (the TAPT stage's log: zokernels.replay it before finetune_log.npz)

TAPT_FILE = "tapt.json"         # the TAPT stage's results, reused by --resume


def tapt_seed(seed: int) -> int:
    """The TAPT stage's perturbation seed: seed + 1 (mod 2^32), so its z differ from fine-tuning's."""
    return (seed + 1) % 2**32


def unlabeled_texts(examples: Iterable, held_out: Iterable, first: Sequence = (), n: int = 0,
                    seed: int = 0) -> list[str]:
    """Distinct texts of `examples` (Examples or strings) that are not the text of a `held_out` example: those of
    `first` first (in order), then the others shuffled with `seed`; the first n of them (0: all). ZOError when
    none is left."""
    import random

    def text(e) -> str:
        return e if isinstance(e, str) else e.text

    banned = {text(e) for e in held_out}
    seen, lead, rest = set(), [], []
    for group, out in ((first, lead), (examples, rest)):
        for e in group:
            t = text(e)
            if t and t not in banned and t not in seen:
                seen.add(t)
                out.append(t)
    random.Random(seed).shuffle(rest)
    texts = lead + rest
    if not texts:
        raise ZOError("TAPT has no unlabeled text: every text of the corpus is a dev or test text")
    return texts[:n] if n else texts


class TextLMCollator:
    """Raw texts -> a next-token batch: input_ids, attention_mask [R, T] (right padded; each text cut to
    `max_tokens` tokens), and target_row, target_pos, target_token [N]: position (r, t) predicts token
    x_{r,t+1}, for every real t < len_r - 1 (a one-token text adds no term)."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True).input_ids[:self.max_tokens]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [self.ids(t) for t in texts]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        t_row, t_pos, t_tok = [], [], []
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, :len(ids)] = 1
            for t in range(len(ids) - 1):
                t_row.append(r), t_pos.append(t), t_tok.append(ids[t + 1])
        if not t_tok:
            raise ZOError("a TAPT batch of one-token texts has nothing to predict")
        as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return {"input_ids": input_ids, "attention_mask": mask, "target_row": as_long(t_row),
                "target_pos": as_long(t_pos), "target_token": as_long(t_tok)}


class CausalLMObjective:
    """L_LM of a TextLMCollator batch (mean next-token NLL). lm_head runs on the real positions only, and a
    trunk cache attached to the model (model.zo_trunk_cache) stands in for the frozen layers."""

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        logits = label_position_logits(model, batch["input_ids"], batch.get("attention_mask"), batch["target_row"],
                                       batch["target_pos"])
        return torch.nn.functional.cross_entropy(logits, batch["target_token"])

    def __repr__(self) -> str:
        return "CausalLMObjective()"


@torch.no_grad()
def heldout_lm_loss(model: nn.Module, collator: TextLMCollator, texts: Sequence[str], batch_size: int = 32,
                    progress: str | None = None) -> dict | None:
    """{'loss': L_LM over all next-token terms of `texts`, 'perplexity': exp(loss), 'tokens': N, 'texts'}, model in
    eval mode; None without texts."""
    if not texts:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(texts), desc=progress, unit="text", leave=False)
    total, count = 0.0, 0
    try:
        for i in range(0, len(texts), batch_size):
            batch = {k: v.to(device) for k, v in collator(texts[i:i + batch_size]).items()}
            logits = label_position_logits(model, batch["input_ids"], batch["attention_mask"], batch["target_row"],
                                           batch["target_pos"])
            total += float(torch.nn.functional.cross_entropy(logits, batch["target_token"], reduction="sum"))
            count += batch["target_token"].numel()
            if bar is not None:
                bar.update(min(batch_size, len(texts) - i))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "texts": len(texts)}
