"""The main job's GPT trained with MD under FSDP2, DDP or tensor parallel, launched by torchrun.

    ./run python -m torch.distributed.run --nproc_per_node 2 -m examples.train_distributed
    ./run python -m torch.distributed.run --nproc_per_node 2 -m examples.train_distributed --ddp
    ./run python -m torch.distributed.run --nproc_per_node 2 -m examples.train_distributed --tp 2
    ./run python -m torch.distributed.run --nproc_per_node 4 -m examples.train_distributed --tp 2
    # on GPUs: torchrun --nproc_per_node 8 -m examples.train_distributed --steps 5000 --width 768

The order that works: mdparam.register_for_recipe -> mdparam.parallelize_module
(tensor parallel) -> fully_shard (or DDP) -> mdparam.recipe (optimizers,
retraction, schedule). With --tp T, a (world/T, T) mesh: attention and MLP
split over "tp", and FSDP2 over "dp" when world > T. Each data-parallel rank
trains on its slice of every global batch; the retraction uses global norms
(one all-reduce per step for flat spheres); --save-every writes a
torch.distributed.checkpoint that --resume continues from; at the end every
rank joins the gather and rank 0 writes the plain safetensors checkpoint that
a single-process plain GPT loads with strict=True.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mdparam
from examples.corpus import load_corpus
from examples.gpt import GPT, GPTConfig
from examples.methods import DEFAULT_LR, OUTPUT_PROJECTIONS, RunConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--lr", type=float, default=DEFAULT_LR["md-adamw-relative"], help="direction LR")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (attention and MLP)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile each block (FSDP2's recipe) or the DDP model",
    )
    p.add_argument(
        "--compile-step",
        action="store_true",
        help="compile the optimizer step (mdparam.compile_step); the retraction runs after it",
    )
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default="runs/distributed")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    heads = args.width // 32
    if args.width % 32:  # heads of 32 dimensions, as the main job's GPT
        p.error(f"--width {args.width} must be a multiple of 32")
    if world % args.tp or heads % args.tp or (args.tp > 1 and args.ddp):
        p.error(
            f"--tp {args.tp} must divide the world size {world} and the {heads} heads, "
            "and goes with FSDP2 (not --ddp) for the data-parallel dimension"
        )
    if args.global_batch % (world // args.tp):
        p.error(
            f"--global-batch {args.global_batch} must be a multiple of the data-parallel size "
            f"{world // args.tp}; change it or --nproc_per_node"
        )
    if args.resume and not (Path(args.out) / "dcp").exists():
        p.error(
            f"--resume: no checkpoint in {Path(args.out) / 'dcp'}; run with --save-every N first"
        )
    return args


def shard(model: GPT, args: argparse.Namespace, device: torch.device, world: int):
    """Tensor parallel over "tp", then FSDP2 (or DDP) over "dp". Returns (forward, dp rank, dp size)."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // args.tp
    mesh = init_device_mesh(device.type, (dp, args.tp), mesh_dim_names=("dp", "tp"))
    if args.tp > 1:  # torch's plan; mdparam swaps in styles that shard D and the gains
        mdparam.parallelize_module(model, mesh["tp"], model.tensor_parallel_plan(args.tp))
    rank = mesh["dp"].get_local_rank()
    if args.ddp:
        net = torch.nn.parallel.DistributedDataParallel(model)
        return (torch.compile(net) if args.compile else net), rank, dp
    if dp > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
            if args.compile:
                block.compile()
        fully_shard(model, mesh=mesh["dp"])
    return model, rank, dp


def init_distributed() -> tuple[int, int, torch.device]:
    """The process group (NCCL on GPUs, else gloo): this rank, the world size, this rank's device."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def build(args: argparse.Namespace, device: torch.device, world: int):
    """The GPT registered, sharded, then set up with mdparam.recipe.

    Returns (model, its forward, the recipe, dp rank, dp size).
    """
    torch.manual_seed(0)  # the same initial model on every rank
    cfg = GPTConfig(256, args.block, args.depth, args.width // 32, args.width)
    model = GPT(cfg).to(device)
    scale = {p: (2 * args.depth) ** -0.5 for p in OUTPUT_PROJECTIONS}
    # 1. register (the recipe's AdamW start); 2. shard; 3. the optimizer and the retraction
    mdparam.register_for_recipe(model, "adamw", head="head", radius_scale=scale)
    net, dp_rank, dp = shard(model, args, device, world)
    knobs = RunConfig()  # the recipe's knobs as the reproduction runs them
    train = mdparam.recipe(
        model,
        "adamw",
        lr=args.lr,
        steps=args.steps,
        gain_lr=knobs.gain_lr,
        other_lr=knobs.other_lr,
        head="head",
        clip_scope="all",  # fused: not for shards yet
    )
    return model, net, train, dp_rank, dp


def sched_state(sched) -> dict:
    """The scheduler's state_dict with float LRs, the same with and without --compile-step.

    mdparam.compile_step makes the LRs 0-d tensors, so the scheduler's ``_last_lr``
    becomes a list of tensors, which torch.distributed.checkpoint saves under other
    keys (``_last_lr.0``, ...) than the floats a fresh scheduler expects.
    """
    state = sched.state_dict()
    return {
        k: [float(x) if isinstance(x, torch.Tensor) else x for x in v] if isinstance(v, list) else v
        for k, v in state.items()
    }


def resume_from(ckpt: Path, model: GPT, opt, sched) -> int:
    """Load the torch.distributed.checkpoint in ``ckpt``; the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "sched": sched_state(sched), "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(state["sched"])
    # The param groups hold the saved run's LRs: its schedule at this step, 0 if it had
    # finished. This run's schedule (its --steps) sets the LR of the step it resumes at:
    # the same when --steps is, else a longer run would take that step at LR 0 (eager
    # AdamW: no step; compiled AdamW: NaN where the second moment is 0, pytorch#126514).
    for group, base, decay in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * decay(sched.last_epoch)
    return int(state["step"])


def compiled_step(model: GPT, train, opt, sched):
    """--compile-step: clip, mdparam.compile_step (the step and the retraction), schedule, zero.

    Built after any resume, which loads the param groups (float LRs).
    """
    compiled = mdparam.compile_step(opt, mdparam.Retraction(model, relative_step=True))

    def step_fn() -> None:
        mdparam.clip_grad_norm_(model, train.clip, scope=train.clip_scope)  # global under TP too
        compiled()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step_fn


def main() -> None:
    args = parse_args()
    rank, world, device = init_distributed()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model, net, train, dp_rank, dp = build(args, device, world)
    opt, sched = train.optimizers[0], train.schedulers[0]
    step_fn = train.step
    if args.compile_step:  # the compiled step runs the retraction itself
        for handle in list(train.retraction.handles):
            handle.remove()

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt = out / "dcp"
    start = resume_from(ckpt, model, opt, sched) if args.resume else 0
    if args.compile_step:
        step_fn = compiled_step(model, train, opt, sched)

    corpus = load_corpus()
    local = args.global_batch // dp
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(step)  # the same global batch on every rank
        x, y = corpus.batch("train", args.global_batch, args.block, gen)
        part = slice(dp_rank * local, (dp_rank + 1) * local)
        loss = F.cross_entropy(net(x[part].to(device)).flatten(0, 1), y[part].to(device).flatten())
        loss.backward()
        step_fn()  # clip, step, retract, schedule, zero the grads
        if step % 20 == 0 or step == args.steps - 1:
            value = loss.detach().clone()
            dist.all_reduce(value)
            if rank == 0:
                print(f"step {step:5d}  loss {float(value) / world:.4f}", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd, "sched": sched_state(sched)}
            dcp.save({**state, "step": torch.tensor(step + 1)}, checkpoint_id=str(ckpt))

    path = mdparam.save_plain(model, out / "model.safetensors", overwrite=True)  # every rank joins
    if rank == 0:
        print(
            f"wrote {path}: load it with GPT(cfg).load_state_dict(safetensors.torch.load_file(path), strict=True)"
        )
    dist.barrier()  # no rank tears down gloo while another still has work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
