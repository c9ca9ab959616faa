"""distributed.py: the several-GPU pieces (torchrun, FSDP2), each a no-op in one plain process.

torchrun starts one process per GPU (nccl) or per CPU slot (gloo) and sets WORLD_SIZE, RANK and
LOCAL_RANK. popsd.py shards the model once, sums its per-step counts over ranks, and gathers RNG
states and evaluation records; rank 0 alone writes (that gating stays visible in popsd's loop).
"""
import contextlib
import os

import torch
import torch.distributed as dist


def setup(device: torch.device):
    """(rank, world size, device). Without torchrun: rank 0 of 1, nothing initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def shard_model(model, device: torch.device, bf16: bool):
    """FSDP2: fully_shard every decoder layer, then the transformer body, the root of what the scoring passes
    call. The frozen output head stays whole on every rank: the loss reads its weight as a [V, H] tensor.
    Gradients are summed over ranks (not averaged): each rank's loss is already divided by the global
    count."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    causal = model.get_base_model()
    body, head = getattr(causal, causal.base_model_prefix), causal.get_output_embeddings()
    if head.weight is body.get_input_embeddings().weight:  # tied embeddings: the head keeps its own copy
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    mixed = device.type == "cuda" and bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                              reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    layers = [m for m in body.modules() if type(m).__name__ in causal._no_split_modules]
    for m in [*layers, body]:
        fully_shard(m, mp_policy=mp)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    head.to(device)


@contextlib.contextmanager
def gathered(model):
    """Under FSDP2, all-gather every sharded module's weights once for the block (generation) instead of at
    every forward: a decoding step is one forward, so sampling T tokens would otherwise gather every layer T
    times. Each rank then holds the whole model until the block ends. No-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)  # as shard_model left it (fully_shard's default)


def all_sum(values: list[float]) -> list[float]:
    """Sums over ranks (as given on one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_sum_named(values: dict) -> dict:
    """all_sum of named numbers: {name: sum over ranks}."""
    names = list(values)
    return dict(zip(names, all_sum([values[k] for k in names])))


def gather(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish():
    """Every rank reaches the end (rank 0 writes the adapter and plots meanwhile) before gloo/nccl are torn
    down: a rank leaving early could close connections a peer still reads (gloo: "terminate called ...")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
