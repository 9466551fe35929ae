"""Calibration data: disjoint WikiText-2 article splits, and token batches from text or ids."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ..eval.data import load_wikitext2, wikitext2_articles
from ..eval.perplexity import adds_bos, encode
from .method import CalibrationError

CALIBRATION_ARTICLES = 10  # WikiText-2 test articles 0-9 calibrate; articles 10+ evaluate


def wikitext2_split(data_dir=None, calibration_articles: int = CALIBRATION_ARTICLES
                    ) -> tuple[str, str, dict[str, Any]]:
    """(calibration text, evaluation text, description): disjoint WikiText-2 test articles.

    Calibration takes the first articles and evaluation the rest, so a plan is never judged
    on the text it was fitted to.
    """
    arts = wikitext2_articles(load_wikitext2(data_dir))
    if len(arts) <= calibration_articles:
        raise CalibrationError(f"WikiText-2 has {len(arts)} articles; cannot keep "
                               f"{calibration_articles} for calibration and evaluate on the rest")
    k = calibration_articles
    info = {"calibration": f"wikitext2 test articles 0-{k - 1}",
            "evaluation": f"wikitext2 test articles {k}-{len(arts) - 1}",
            "source": f"wikitext2 test articles 0-{k - 1} (disjoint from the evaluation articles {k}+)"}
    return "".join(arts[:k]), "".join(arts[k:]), info


def token_batches(tokens_or_texts, tokenizer=None, *, token_budget: int = 16384, batch_size: int = 4,
                  seq_len: int = 512, seed: int = 0) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Calibration batches ``[B, seq_len]`` from token ids or texts, at most ``token_budget`` tokens.

    Texts are tokenised without special tokens and cut into sequences; with a tokenizer that
    adds BOS by default (Gemma) each sequence starts with BOS, as the model expects. When the
    text has more sequences than the budget needs, a seeded random subset is used.
    """
    if token_budget < 1 or batch_size < 1 or seq_len < 2:
        raise CalibrationError(f"need token_budget >= 1, batch_size >= 1, seq_len >= 2; got "
                               f"{token_budget}, {batch_size}, {seq_len}")
    bos = None
    if tokenizer is not None and adds_bos(tokenizer):
        bos = tokenizer.bos_token_id
    if isinstance(tokens_or_texts, str):
        tokens_or_texts = [tokens_or_texts]
    if isinstance(tokens_or_texts, torch.Tensor):
        t = tokens_or_texts.long()
        rows = [r for r in (t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1]))]
        kind = "token ids"
    elif isinstance(tokens_or_texts, Sequence) and tokens_or_texts and all(isinstance(x, str) for x in tokens_or_texts):
        if tokenizer is None:
            raise CalibrationError("calibration texts need a tokenizer (tokenizer=...)")
        ids: list[int] = []
        for text in tokens_or_texts:
            ids += encode(tokenizer, text)
        rows = [torch.tensor(ids, dtype=torch.long)]
        kind = f"{len(tokens_or_texts)} text(s)"
    elif isinstance(tokens_or_texts, Sequence) and tokens_or_texts and all(isinstance(x, int) for x in tokens_or_texts):
        rows = [torch.tensor(list(tokens_or_texts), dtype=torch.long)]
        kind = "token ids"
    else:
        raise CalibrationError("calibration data must be a string, a list of strings, or token ids "
                               "(a list of ints or a LongTensor)")
    body = seq_len - (1 if bos is not None else 0)
    chunks = [r[i : i + body] for r in rows for i in range(0, len(r) - body + 1, body)]
    if not chunks:  # shorter than one sequence: use what there is
        longest = max(rows, key=len)
        if len(longest) < 1:
            raise CalibrationError("calibration data is empty")
        chunks = [longest[:body]]
    want = max(1, token_budget // len(chunks[0]))
    if len(chunks) > want:
        pick = sorted(random.Random(seed).sample(range(len(chunks)), want))
        chunks = [chunks[i] for i in pick]
    if bos is not None:
        chunks = [torch.cat([torch.tensor([bos]), c]) for c in chunks]
    seqs = torch.stack(chunks)
    batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
    info = {"tokens": int(sum(len(c) for c in chunks)), "sequences": len(chunks),
            "seq_len": int(seqs.shape[1]), "bos": bos is not None, "data": kind}
    return batches, info
