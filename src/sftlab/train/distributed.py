"""Data-parallel training on torch.distributed: `torchrun --nproc_per_node N -m sftlab train CFG` (or
`sftlab train CFG --nproc N`, which execs torchrun), DDP or FSDP2.

What N processes agree on, so that they train the model one process would with the same global batch:

- The data order is the one-process order of *global* micro-batches (batch_size x world examples, or a token
  budget of max_tokens x world); each rank takes its contiguous share of each one (`local_part`). A share can be
  empty (the epoch's last micro-batch has fewer examples than processes): that rank runs a stand-in pass with
  weight 0, so every rank joins the gradient all-reduce.
- The step's loss is normalised by the supervised targets of the whole global step (all-reduced before any
  backward); the gradient all-reduce *sums* (a DDP comm hook; FSDP2 reduce-scatters with the sum too), so the
  gradient is the global batch's own, as in one process.
- Rank 0 writes metrics, plots, checkpoints and final/; each rank evaluates its share of the eval set and the sums
  are all-reduced (train/eval_loss.py), so every rank gets the one-process numbers and early stopping agrees.
  DDP checkpoints are rank 0's copy (all ranks hold the same weights and optimizer state); FSDP2 checkpoints
  gather the full tensors (`full_tensor`) onto every rank and rank 0 writes them in the one-process format, so a
  checkpoint resumes under any world size.
- Ctrl-C stops every rank at the same step boundary: a rank that received it says so in the next step's first
  all-reduce, and all of them stop there (`StopAgreed`; train/interrupt.py) and save that step once.
- A process that dies, or stops answering for train.dist_timeout_s, makes the others fail with a
  `DistributedError` naming the step; checkpoints are written atomically, so the last one stays intact.

Backends: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SftlabError
from .device import Precision
from .objective import count_supervised

# A rank asking to stop adds this to the real-token count of the step's first all-reduce: no extra collective, and
# not a third number either (gloo's all-reduce of 3 float64s took ~100-300 us more than of 2 on a 2-process CPU run,
# ~1% of a tiny model's step). Exact in float64 below 2**53 / 2**40 = 8192 ranks, for steps under 2**40 tokens.
STOP_TOKENS = 2**40
PASS_WEIGHT = "pass_weight"  # a collated pass's weight in the step: 0 for a stand-in pass (see local_part)


class DistributedError(SftlabError, RuntimeError):
    """Another process of a distributed run died or stopped answering; the message says what to do."""


class StopAgreed(KeyboardInterrupt):
    """Ctrl-C reached some process of the run (train/interrupt.py): every process stops at the start of this same
    step, as at a Ctrl-C in one process."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, and the wrapper (None: one process, no wrapper)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    kind: str | None = None  # "ddp" | "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.kind is not None


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    get = os.environ.get
    return int(get("RANK", 0)), int(get("WORLD_SIZE", 1)), int(get("LOCAL_RANK", 0))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(kind: str | None, device: torch.device, timeout_s: float) -> Dist:
    """Join the process group torchrun describes (env://) when there is more than one process; the Dist to train
    with. A group already made (tests spawn their own) is used as it is."""
    rank, world, local = env_world()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))
    if world == 1:
        return Dist()
    return Dist(rank, world, local, kind or "ddp")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current(kind: str | None = None) -> Dist:
    """The Dist of an initialised process group (ddp unless `kind` says), else one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), env_world()[2], kind or "ddp")


# -- the data: each rank's share of a global micro-batch -------------------------------------------------------


def local_part(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global micro-batch (sizes differ by at most one; may be empty)."""
    n = len(batch)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return batch[lo:hi]


# -- a step's passes: what they count, and the step on this rank's share ------------------------------------------


class PassCounts(NamedTuple):
    supervised: int  # the targets the step's loss is normalised by (per-token normalisation)
    real: int  # non-pad tokens (tokens/s, state.tokens)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a collated pass."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def pass_counts(passes: list[dict], task: str) -> PassCounts:
    """What a step's passes count, known before any forward: one process's whole step, or this rank's share of a
    distributed one (a stand-in pass, PASS_WEIGHT 0, counts nothing). The one place both paths derive it."""
    counted = [b for b in passes if float(b.get(PASS_WEIGHT, 1.0))]
    return PassCounts(sum(count_supervised(b, task) for b in counted), sum(real_tokens(b) for b in counted))


def distributed_step(
    wrapped: nn.Module,
    passes: list[dict],
    task: str,
    precision: Precision,
    device: torch.device,
    d: Dist,
    stop: bool = False,
) -> tuple[float, int, int]:
    """The forward/backward of this rank's share of a global step: (loss per supervised target of the whole step,
    its supervised count, its real tokens). Normalised by the global supervised count (all-reduced before any
    backward); each rank's passes accumulate locally and are all-reduced (summed) in the backward of its last one.
    `stop`: Ctrl-C reached this rank; it rides in the same all-reduce (STOP_TOKENS added to the real-token count),
    and when any rank set it every rank raises StopAgreed here, before the step's first forward."""
    weights = [float(b.get(PASS_WEIGHT, 1.0)) for b in passes]
    local = pass_counts(passes, task)
    passes = [{k: v for k, v in b.items() if k != PASS_WEIGHT} for b in passes]
    n_total, real = (int(x) for x in all_sum([local.supervised, local.real + STOP_TOKENS * stop], device, d))
    stops, real = divmod(real, STOP_TOKENS)
    if stops:
        raise StopAgreed
    if n_total == 0:  # every rank sees it: none runs a backward
        return 0.0, 0, 0
    loss_sum = 0.0
    for i, (batch, w) in enumerate(zip(passes, weights)):
        with no_sync(wrapped, last=i == len(passes) - 1):
            with precision.autocast():
                loss = wrapped(batch).loss
            precision.backward(loss * w / n_total if w != 1.0 else loss / n_total)
        loss_sum += w * float(loss.detach())
    (total,) = all_sum([loss_sum], device, d)
    return total / n_total, n_total, real


# -- collectives, failing with a clear error -------------------------------------------------------------------


_within: list[str] = []  # the peers() contexts open in this process


@contextlib.contextmanager
def peers(what: str, rank: int = 0, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a collective that failed (a peer died, or did not answer within the timeout) into DistributedError;
    sftlab's own errors and the `keep` types pass through unchanged. Nested, the outermost names the failure (the
    loop's "step N" rather than the all-reduce inside it)."""
    if _within:
        yield
        return
    _within.append(what)
    try:
        yield
    except (SftlabError, *keep):
        raise
    except (RuntimeError, dist.DistError) as e:
        if not (dist.is_available() and dist.is_initialized()) or not _peer_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(
            f"rank {rank}: lost the other processes of the distributed run during {what} ({first}); "
            "the last checkpoint is intact: restart with --resume"
        ) from e
    finally:
        _within.pop()


_PEER_SIGNS = ("connection", "timed out", "timeout", "peer", "broken pipe", "socket", "abort")


def _peer_failure(e: BaseException) -> bool:
    """A collective that failed because another process is gone or silent (not a bug of this one)."""
    if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    text = str(e).lower()
    return any(sign in text for sign in _PEER_SIGNS)


def all_sum(values: list[float], device: torch.device, d: Dist) -> list[float]:
    """Sums over the ranks of a few numbers, in one float64 all-reduce (counts stay exact up to 2^53)."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    with peers("an all-reduce", d.rank):
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank (a few picklable values: per-example eval scores)."""
    if not d.active:
        return [obj]
    out: list = [None] * d.world
    with peers("an all-gather", d.rank):
        dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist, what: str) -> None:
    if d.active:
        with peers(what, d.rank):
            dist.barrier()


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank (decisions only rank 0 can make, e.g. after touching the run directory)."""
    if not d.active:
        return obj
    box = [obj]
    with peers("a broadcast", d.rank):
        dist.broadcast_object_list(box, src=0)
    return box[0]


# -- wrapping the objective -------------------------------------------------------------------------------------


def _sum_hook(state, bucket):
    """DDP comm hook: all-reduce by sum (DDP's default divides by the world size). The loss of each rank is already
    normalised by the global step's supervised targets, so the sum is the global batch's gradient."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(objective: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The module the loop calls: DistributedDataParallel around the objective, or the objective sharded in place by
    FSDP2 (each decoder block its own unit, the rest with the root); the objective itself for one process."""
    if not d.active:
        return objective
    if d.kind == "fsdp":
        return shard_fsdp(objective, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(
        objective,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # no batch-norm statistics: every rank holds the same buffers
        find_unused_parameters=True,  # per-task heads/adapters, and passes with no supervised token
    )
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the largest ModuleList of the body), FSDP2's units."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])


def shard_fsdp(objective: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: each block its own all-gather unit, then the root (embeddings, norm, head) with the
    objective, whose forward reads the head's weight (unsharded by the root's pre-forward). Gradients are summed
    over the ranks (like DDP's `_sum_hook`): each rank's loss is already normalised by the global count."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [*_blocks(objective), objective]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=unit is not objective)
    for unit in units:
        # gradient divide factor 1: reduce-scatter sums instead of averaging, as a plain SUM (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return objective


def no_sync(wrapped: nn.Module, last: bool):
    """DDP: accumulate this pass's gradient locally unless it is the step's last pass on this rank (whose backward
    all-reduces the sum of all of them). FSDP2: reduce only on the last pass too."""
    if last:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """An FSDP2 unit's own parameters whole while code that bypasses its forward runs: generation calls
    objective.model, so the root's pre-forward never gathers the embeddings, norm and head, which would otherwise
    be whole only if an earlier root forward happened to leave them so. An all-gather: every rank enters together.
    Not recursive (the blocks gather themselves in their own forwards). Anything else than an FSDP2 unit: nothing."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()  # local: frees the gathered copies, as after a training step's backward


# -- full tensors of sharded parameters (FSDP2 checkpoints and final/) -----------------------------------------


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it, in the same order); `t` otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A full tensor `t` laid out as `ref` (sharded like it when `ref` is a DTensor). Every rank holds the whole `t`
    (read from the same checkpoint), so each cuts its own shard: no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
    return t


def unshard(model: nn.Module) -> None:
    """After an FSDP2 run: every parameter back to one whole tensor (a collective: all ranks call it) and every
    module back to its own class, so final/ is saved as from one process (one HF directory). The model is not
    trained further after this."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    done: dict[int, nn.Parameter] = {}  # tied weights stay tied
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(
                        p.full_tensor().detach().clone(), requires_grad=p.requires_grad
                    )
                module._parameters[name] = done[id(p)]
        if isinstance(module, FSDPModule):
            module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))
