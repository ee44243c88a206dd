"""The objective module: one forward for training and evaluation, and wrappable by DDP (its hooks fire)."""

import torch
import torch.distributed as dist
from helpers import causal_lm_with_method, compute_loss
from torch.nn.parallel import DistributedDataParallel as DDP

from sftlab.config import PerfConfig
from sftlab.data.batching import collate, collate_packed
from sftlab.train import patches
from sftlab.train.eval_loss import eval_loss
from sftlab.train.objective import Objective


def _examples():
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (9, 23, 5, 16):
        ids = torch.randint(4, 260, (n,), generator=g).tolist()
        exs.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return exs


def test_ddp_wraps_the_objective_same_gradients_and_its_hooks_fire(tmp_path):
    """The loss reaches the body and the head only through Objective.forward, so DDP sees the whole step:
    its gradient hooks (a comm hook here) run on every parameter, and the gradients are the unwrapped ones."""
    model = causal_lm_with_method("tiny-llama", "lora", r=4)
    batch = collate_packed(_examples())
    perf = PerfConfig(onednn_gemm=False)
    model.zero_grad(set_to_none=True)
    loss, _ = compute_loss(model, batch, "causal-lm")
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DDP(Objective(model, "causal-lm", perf))
        reduced = []

        def count(state, bucket):
            reduced.extend(bucket.parameters())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        wrapped.register_comm_hook(None, count)
        with patches.applied(model, perf, malloc=False):
            out = wrapped(batch)
            out.loss.backward()
    finally:
        dist.destroy_process_group()
    assert len(reduced) == len(ref)  # every trainable parameter went through DDP's reducer
    torch.testing.assert_close(out.loss.detach(), loss.detach())
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_eval_loss_is_the_objective_summed_per_token():
    model = causal_lm_with_method("tiny-llama", "full")
    exs = _examples()
    objective = Objective(model, "causal-lm", PerfConfig(onednn_gemm=False))
    res = eval_loss(objective, exs, batch_size=3, pad_id=0)
    with torch.no_grad():
        outs = [objective(collate([e], 0, "causal-lm")) for e in exs]
    total, n = sum(float(o.loss) for o in outs), sum(o.count for o in outs)
    assert res["eval_tokens"] == n == sum(len(e["input_ids"]) - len(e["input_ids"]) // 2 for e in exs)
    assert abs(res["eval_loss"] - total / n) < 1e-5


def test_seq_cls_counts_correct_rows():
    from sftlab.models import build_tiny

    model, _ = build_tiny("tiny-bert", "seq-cls", num_labels=3)
    ids = torch.randint(4, 200, (5, 7), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    labels = pred.clone()
    labels[:2] = (pred[:2] + 1) % 3  # two rows wrong
    out = Objective(model, "seq-cls")({**batch, "labels": labels})
    assert out.count == 5 and out.correct == 3
