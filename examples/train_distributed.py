"""The main job's GPT trained with MD under FSDP2 (or DDP), launched by torchrun.

    ./run python -m torch.distributed.run --nproc_per_node 2 examples/train_distributed.py
    ./run python -m torch.distributed.run --nproc_per_node 2 examples/train_distributed.py --ddp
    # on GPUs: torchrun --nproc_per_node 8 examples/train_distributed.py --steps 5000 --width 768

The order that works: register -> fully_shard (or DDP) -> optimizer ->
Retraction. Each rank trains on its slice of every global batch; the
retraction uses global norms (one all-reduce per step for flat spheres);
--save-every writes a torch.distributed.checkpoint that --resume continues
from; at the end every rank joins the gather and rank 0 writes the plain
safetensors checkpoint that a single-process plain GPT loads with strict=True.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mdparam
from benchmarks.methods import DEFAULT_LR, RunConfig
from examples.corpus import load_corpus
from examples.gpt import GPT, GPTConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--lr", type=float, default=DEFAULT_LR["md-adamw"], help="direction LR")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
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
    if args.width % 32:  # heads of 32 dimensions, as the main job's GPT
        p.error(f"--width {args.width} must be a multiple of 32")
    if args.global_batch % world:
        p.error(
            f"--global-batch {args.global_batch} must be a multiple of the world size {world}; "
            "change it or --nproc_per_node"
        )
    if args.resume and not (Path(args.out) / "dcp").exists():
        p.error(
            f"--resume: no checkpoint in {Path(args.out) / 'dcp'}; run with --save-every N first"
        )

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # the same initial model on every rank
    cfg = GPTConfig(256, args.block, args.depth, args.width // 32, args.width)
    model = GPT(cfg).to(device)
    mdparam.register(model, exclude="head")  # 1. register
    if args.ddp:  # 2. shard or replicate
        net = torch.nn.parallel.DistributedDataParallel(model)
        if args.compile:
            net = torch.compile(net)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
            if args.compile:
                block.compile()
        fully_shard(model, mesh=mesh)
        net = model
    recipe = RunConfig()  # 3. the main job's MD-AdamW recipe (benchmarks/methods.py)
    opt = torch.optim.AdamW(
        mdparam.param_groups(
            model,
            lr=args.lr,
            gain_lr=recipe.gain_lr,
            other_lr=recipe.other_lr,
            other_weight_decay=0.0,
        )
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
    retraction = mdparam.Retraction(model)  # 4.
    if not args.compile_step:
        retraction.attach(opt)

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    start = 0
    ckpt = out / "dcp"
    if args.resume:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=str(ckpt))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        for _ in range(start):
            sched.step()

    # Built after any resume, which loads the optimizer's param groups (float LRs).
    step_fn = mdparam.compile_step(opt, retraction) if args.compile_step else opt.step
    corpus = load_corpus()
    local = args.global_batch // world
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(step)  # the same global batch on every rank
        x, y = corpus.batch("train", args.global_batch, args.block, gen)
        x, y = (
            x[rank * local : (rank + 1) * local].to(device),
            y[rank * local : (rank + 1) * local].to(device),
        )
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)  # as the main job
        step_fn()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == args.steps - 1:
            value = loss.detach().clone()
            dist.all_reduce(value)
            if rank == 0:
                print(f"step {step:5d}  loss {float(value) / world:.4f}", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            msd, osd = get_state_dict(model, opt)
            dcp.save(
                {"model": msd, "optim": osd, "step": torch.tensor(step + 1)},
                checkpoint_id=str(ckpt),
            )

    path = mdparam.save_plain(
        model, out / "model.safetensors", overwrite=True
    )  # every rank; rank 0 writes
    if rank == 0:
        print(
            f"wrote {path}: load it with GPT(cfg).load_state_dict(safetensors.torch.load_file(path), strict=True)"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
