"""Generation and padding for prefix, P-tuning and prompt tuning.

Cached greedy generation equals uncached generation and a manual cached loop; a left-padded batch equals each
row generated alone; a padded forward equals unpadded single rows (every family, right padding for BERT).
"""

from __future__ import annotations

import pytest
import torch
from _prompt_helpers import GEN_FAMILIES, METHODS, applied, padded, randomize
from helpers import FAMILIES
from torch.testing import assert_close

ROWS = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62]]
NEW = 5
GREEDY = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}


def _generate(model, ids, mask, use_cache=True):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
            **GREEDY,
        )
    return out.sequences[:, -NEW:], torch.stack(out.scores, 1)  # (B, NEW), (B, NEW, V)


@torch.no_grad()
def _manual_greedy(model, ids, mask, seq2seq: bool) -> torch.Tensor:
    """Greedy decoding by hand with the model's KV cache (no generate())."""
    out_tokens = []
    if seq2seq:
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask)
        step = {"encoder_outputs": enc, "attention_mask": mask}
        nxt = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        cache = None
        for _ in range(NEW):
            out = model(**step, decoder_input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            out_tokens.append(nxt)
        return torch.cat(out_tokens, 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    for _ in range(NEW):
        nxt = out.logits[:, -1:].argmax(-1)  # (B, 1)
        out_tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
    return torch.cat(out_tokens, 1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,task", GEN_FAMILIES)
def test_cached_generation_equals_uncached_and_single_rows(name, task, method):
    model, tuned, _, _ = applied(name, task, method)
    randomize(tuned, std=1.0)
    ids, mask = padded(ROWS)
    tokens, scores = _generate(tuned, ids, mask)
    tokens_nc, scores_nc = _generate(tuned, ids, mask, use_cache=False)
    assert torch.equal(tokens, tokens_nc)
    assert_close(scores, scores_nc, rtol=1e-4, atol=1e-4)
    assert torch.equal(_manual_greedy(tuned, ids, mask, task == "seq2seq"), tokens)
    for i, row in enumerate(ROWS):
        one, one_scores = _generate(tuned, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
        assert torch.equal(one[0], tokens[i])
        assert_close(one_scores[0], scores[i], rtol=1e-4, atol=1e-4)
    _, base_scores = _generate(model, ids, mask)
    assert (base_scores - scores).abs().max() > 1e-2  # the method really changed the model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,task", FAMILIES)
def test_padded_forward_equals_single_rows(name, task, method):
    """Per row, a padded batch gives the unpadded row's outputs (BERT right-padded: its pooler reads slot 0)."""
    _, tuned, _, _ = applied(name, task, method)
    randomize(tuned, std=1.0)
    side = "right" if task == "seq-cls" else "left"
    ids, mask = padded(ROWS, side)
    extra = {"decoder_input_ids": torch.tensor([[0, 7, 8]] * len(ROWS))} if task == "seq2seq" else {}
    with torch.no_grad():
        batch = tuned(input_ids=ids, attention_mask=mask, **{k: v for k, v in extra.items()}).logits
        for i, row in enumerate(ROWS):
            one_extra = {k: v[i : i + 1] for k, v in extra.items()}
            one = tuned(input_ids=torch.tensor([row]), **one_extra).logits[0]
            if task == "causal-lm":
                got = batch[i][mask[i].bool()]  # real positions only
            else:
                got = batch[i]
            assert_close(got, one, rtol=1e-4, atol=1e-4)
