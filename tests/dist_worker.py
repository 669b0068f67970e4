"""Worker processes for the distributed tests (real torch.distributed, gloo on CPU).

Each scenario trains the tiny GPT on the same global batches (8 sequences per
step, seeded by the step index) and writes what the test checks into
``outdir``. ``single`` runs in one process; ``ddp`` and ``fsdp`` split each
global batch between the ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import FusedExperts, sphere_error, tiny_gpt

import mdparam

GLOBAL_BATCH, SEQ, VOCAB = 8, 16, 64
CLIP = 0.3


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def build(
    mode: str,
    world: int,
    compile: bool = False,
    relative: bool = False,
    attach: bool = True,
    layers: int = 2,
):
    model = tiny_gpt(seed=0, n_layer=layers)
    mdparam.register(model)
    if mode in ("tp", "tp2d"):
        net = tensor_parallel(model, world, two_d=mode == "tp2d")
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        net = model
    elif mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        net = model
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.01, gain_lr=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)
    retract = mdparam.Retraction(model, relative_step=relative)
    if attach:
        retract.attach(opt)
    fwd = net
    if compile and mode == "fsdp":
        for block in model.blocks:  # FSDP2's recipe: compile each sharded block
            block.compile()
    elif compile:
        fwd = torch.compile(net, fullgraph=True)
    return model, fwd, opt, sched, retract


def tensor_parallel(model, world: int, two_d: bool = False):
    """Attention and MLP split over a "tp" mesh (torch's plan, mdparam.parallelize_module);
    with ``two_d``, a (dp, tp) mesh and fully_shard over "dp" on top."""
    from torch.distributed.device_mesh import init_device_mesh

    shape, names = ((2, world // 2), ("dp", "tp")) if two_d else ((world,), ("tp",))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    mdparam.parallelize_module(model, mesh["tp"], model.tensor_parallel_plan(mesh["tp"].size()))
    if two_d:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def data_part(mode: str, rank: int, world: int) -> tuple[int, int]:
    """(which part, how many parts) of each global batch this rank trains on."""
    if mode in ("single", "tp"):
        return 0, 1  # tensor-parallel ranks all see the whole batch
    if mode == "tp2d":
        return rank // (world // 2), 2  # mesh (dp, tp): ranks of one dp index share a part
    return rank, world


def train(
    model, fwd, opt, sched, mode: str, rank: int, world: int, steps: range, step_fn=None
) -> tuple[list, list]:
    losses, sphere = [], []
    part, parts = data_part(mode, rank, world)
    for step in steps:
        x, y = batch(step)
        x, y = x.chunk(parts)[part], y.chunk(parts)[part]
        loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
        loss.backward()
        # the authors' clipping, global under every kind of sharding; low enough to bite
        mdparam.clip_grad_norm_(model, CLIP, scope="fused")
        (step_fn or opt.step)()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if mode != "single":
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
        sphere.append(sphere_error(model))
    return losses, sphere


def scenario_train(rank: int, world: int, mode: str, outdir: Path, compile: bool = False) -> None:
    # compiled: one block, as each block compiles alone (cold compiles cost the suite most)
    model, fwd, opt, sched, retract = build(mode, world, compile, layers=1 if compile else 2)
    steps = 10 if not compile else 3
    from torch._dynamo.utils import counters

    losses, sphere = train(model, fwd, opt, sched, mode, rank, world, range(steps))
    # the retraction's public counters: retractions run, collectives for sharded norms
    calls = {"n": retract.all_reduces, "retractions": retract.calls}
    calls["graphs"] = counters["stats"]["unique_graphs"]
    calls["graph_breaks"] = sum(counters["graph_break"].values())
    path = mdparam.save_plain(model, outdir / f"{mode}.safetensors", overwrite=True)
    if rank == 0:
        (outdir / f"{mode}.json").write_text(
            json.dumps(
                {
                    "losses": losses,
                    "sphere": sphere,
                    "retraction_all_reduces": calls["n"],
                    "retractions": calls["retractions"],
                    "graphs": calls.get("graphs", 0),
                    "graph_breaks": calls.get("graph_breaks", 0),
                    "path": str(path),
                }
            )
        )


class KindsNet(torch.nn.Module):
    """Row and col spheres, a per-unit radius from init, batched experts: every sharded case."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.rows = torch.nn.Linear(16, 32)
        self.experts = FusedExperts(experts=4, hidden=32, inner=8)
        self.cols = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, x):
        h = torch.tanh(self.rows(self.emb(x)))
        h = h + self.experts(h)
        return self.head(self.cols(h))

    def loss(self, x, y):
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())


def scenario_kinds(rank: int, world: int, mode: str, outdir: Path) -> None:
    """Row/col spheres, radius from init and experts, single process or FSDP2, relative step."""
    torch.manual_seed(0)
    model = KindsNet()
    mdparam.register(
        model,
        layers="all",
        exclude="emb",
        radius="init",
        overrides={"rows": {"sphere": "row"}, "cols": {"sphere": "col"}},
    )
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for sub in (model.rows, model.experts, model.cols):
            fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)
    mdparam.Retraction(model, relative_step=True).attach(opt)
    losses, sphere = train(model, model, opt, sched, mode, rank, world, range(6))
    mdparam.save_plain(model, outdir / f"kinds_{mode}.safetensors", overwrite=True)
    if rank == 0:
        (outdir / f"kinds_{mode}.json").write_text(json.dumps({"losses": losses, "sphere": sphere}))


def scenario_dcp(rank: int, world: int, phase: str, outdir: Path) -> None:
    """Save at step 5 with torch.distributed.checkpoint; resume in fresh processes to step 10."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, fwd, opt, sched, _ = build("fsdp", world)
    ckpt = outdir / "dcp"
    if phase == "save":
        train(model, fwd, opt, sched, "fsdp", rank, world, range(5))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
        if rank == 0:
            torch.save(sched.state_dict(), outdir / "sched.pt")
        return
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(torch.load(outdir / "sched.pt"))
    losses, _ = train(model, fwd, opt, sched, "fsdp", rank, world, range(5, 10))
    mdparam.save_plain(model, outdir / "resumed.safetensors", overwrite=True)
    if rank == 0:
        (outdir / "resumed.json").write_text(json.dumps({"losses": losses}))


def scenario_compile_step(rank: int, world: int, outdir: Path) -> None:
    """FSDP2: mdparam.compile_step against the attached eager step, plain and relative mode."""
    from conftest import rel_err
    from torch._dynamo.utils import counters

    result = {}
    for relative in (False, True):
        runs = {}
        for how in ("attach", "compile_step"):
            model, fwd, opt, sched, retract = build(
                "fsdp", world, relative=relative, attach=how == "attach", layers=1
            )
            step_fn = mdparam.compile_step(opt, retract) if how == "compile_step" else None
            graphs = counters["stats"]["unique_graphs"]
            losses, sphere = train(model, fwd, opt, sched, "fsdp", rank, world, range(4), step_fn)
            if how == "compile_step":  # the step really compiled
                result[f"graphs_relative_{relative}"] = counters["stats"]["unique_graphs"] - graphs
            runs[how] = (losses, sphere, mdparam.plain_state_dict(model))
        (la, _, wa), (lc, sc, wc) = runs["attach"], runs["compile_step"]
        result["relative" if relative else "plain"] = {
            "loss_err": max(abs(a - c) / abs(a) for a, c in zip(la, lc)),
            "weight_err": max(rel_err(wc[k], wa[k]) for k in wa),
            "sphere": max(sc),
        }
    if rank == 0:
        (outdir / "compile_step.json").write_text(json.dumps(result))


def scenario_save_fails(rank: int, world: int, outdir: Path) -> None:
    """FSDP2 save_plain whose writer (rank 0) fails before and midway through its gathers."""
    import contextlib
    from unittest import mock

    import mdparam._checkpoint as ck

    model, *_ = build("fsdp", world)
    errors = {}

    def attempt(what: str, patches: dict, **save_kwargs) -> None:
        """save_plain with some of mdparam._checkpoint's names patched; record its error."""
        with contextlib.ExitStack() as stack:
            for name, fn in patches.items():
                stack.enter_context(mock.patch.object(ck, name, fn))
            try:
                mdparam.save_plain(model, outdir / f"{what}.safetensors", **save_kwargs)
            except Exception as e:
                errors[what] = f"{type(e).__name__}: {e}"

    def refusing_write(*args, **kwargs):  # rank 0 fails before reading any tensor
        raise PermissionError("simulated read-only directory")

    real_write, produced = ck.write_file, {"n": 0}

    def failing_write(path, specs, produce, *args, **kwargs):  # the disk fails at tensor 4
        def failing_produce(name):
            produced["n"] += 1
            if produced["n"] == 4:
                raise OSError("simulated disk error")
            return produce(name)

        return real_write(path, specs, failing_produce, *args, **kwargs)

    attempt("bad_metadata", {}, metadata={"step": 5})  # checked on every rank, before any gather
    attempt("before", {"write_file": refusing_write} if rank == 0 else {})
    attempt("midway", {"write_file": failing_write} if rank == 0 else {})
    errors["tensors_before_failure"] = produced["n"]
    mdparam.save_plain(model, outdir / "after.safetensors")  # the group still works
    (outdir / f"save_fails_{rank}.json").write_text(json.dumps(errors))


def scenario_tp_errors(outdir: Path) -> None:
    """What a user meets with torch's own styles, or with a tied layer in the plan."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    errors = {}
    model = tiny_gpt()
    mdparam.register(model)
    try:
        parallelize_module(model, mesh, {"blocks.0.mlp.up": ColwiseParallel()})  # torch's own
    except Exception as e:
        errors["torch_styles"] = f"{type(e).__name__}: {e}"
    tied = tiny_gpt(tie_head=True)
    mdparam.register(tied, tied="share")
    try:
        mdparam.parallelize_module(tied, mesh, {"head": ColwiseParallel()})
    except NotImplementedError as e:
        errors["tied"] = str(e)
    (outdir / "tp_errors.json").write_text(json.dumps(errors))


def scenario_recipe(rank: int, world: int, mode: str, outdir: Path) -> None:
    """The recipe's fused step under DDP (recipe, then DDP); under FSDP2 and tensor
    parallelism (register_for_recipe, shard, recipe) the recipe falls back, once, loudly."""
    import warnings

    model = tiny_gpt(seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode in ("single", "ddp"):
            train = mdparam.recipe(model, "adamw", lr=0.02, steps=10, head="head", clip=CLIP)
        else:
            mdparam.register_for_recipe(model, "adamw", head="head")
            if mode == "fsdp":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (world,))
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            else:
                tensor_parallel(model, world)
            train = mdparam.recipe(model, "adamw", lr=0.02, steps=10, head="head", clip=CLIP)
    net = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    reduced = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    losses = []
    part, parts = data_part(mode, rank, world)
    for step in range(10):
        x, y = batch(step)
        loss = F.cross_entropy(
            net(x.chunk(parts)[part]).flatten(0, 1), y.chunk(parts)[part].flatten()
        )
        loss.backward()
        train.step()
        value = loss.detach().clone()
        if mode != "single":
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    sphere = sphere_error(model)  # gathers sharded directions: every rank takes part
    if rank == 0:
        (outdir / f"recipe_{mode}.json").write_text(
            json.dumps(
                {
                    "losses": losses,
                    "repr": repr(train),
                    "fused": train.fused is not None,
                    "warnings": [str(w.message) for w in caught if "fused step" in str(w.message)],
                    "reduced": reduced,
                    "sphere": sphere,
                }
            )
        )


def scenario_ddp_before_recipe(rank: int, world: int, outdir: Path) -> None:
    """DDP built before the recipe made the kept weights: the first step says what to do."""
    model = tiny_gpt(seed=0)
    net = torch.nn.parallel.DistributedDataParallel(model)
    train = mdparam.recipe(model, "adamw", lr=0.02, head="head", compile=False)
    x, y = batch(0)
    part = x.chunk(world)[rank], y.chunk(world)[rank]
    F.cross_entropy(net(part[0]).flatten(0, 1), part[1].flatten()).backward()
    try:
        train.step()
        message = ""
    except RuntimeError as e:
        message = str(e)
    if rank == 0:
        (outdir / "ddp_before.txt").write_text(message)


def scenario_conv_kernel_shard(rank: int, world: int, outdir: Path) -> None:
    """A convolution sharded along its kernel, radius="init" on a column sphere: the radius
    varies along a dim the kernel shares, so no slice of it is this rank's; the retraction
    (which hands the layout over as an object) and clipping (as a name) both refuse it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, kernel_size=(4, 1)))
    mdparam.register(model, layers="all", radius="init", sphere="col")
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(2) if p.ndim == 4 else None)
    model(torch.randn(2, 4, 8, 8)).square().mean().backward()
    errors = {}
    for name, call in (
        ("retraction", lambda: mdparam.Retraction(model)()),
        ("clip", lambda: mdparam.clip_grad_norm_(model, 1.0)),
    ):
        try:
            call()
            errors[name] = ""
        except NotImplementedError as e:
            errors[name] = str(e)
    if rank == 0:
        (outdir / "conv_kernel_shard.json").write_text(json.dumps(errors))


def worker(rank: int, world: int, store_path: str, scenario: str, args: list) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    # A rank left waiting in a collective fails this scenario in a minute, not gloo's 30.
    timeout = timedelta(seconds=60) if scenario == "save_fails" else None
    # A file rendezvous: a free TCP port found first and bound later by the workers could
    # be taken in between by another pytest worker's launch.
    store = dist.FileStore(store_path, world)
    kw = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, **kw)
    try:
        if scenario == "train":
            scenario_train(rank, world, *args)
        elif scenario == "dcp":
            scenario_dcp(rank, world, *args)
        elif scenario == "recipe":
            scenario_recipe(rank, world, *args)
        elif scenario == "ddp_before_recipe":
            scenario_ddp_before_recipe(rank, world, *args)
        elif scenario == "conv_kernel_shard":
            scenario_conv_kernel_shard(rank, world, *args)
        elif scenario == "kinds":
            scenario_kinds(rank, world, *args)
        elif scenario == "compile_step":
            scenario_compile_step(rank, world, *args)
        elif scenario == "save_fails":
            scenario_save_fails(rank, world, *args)
        elif scenario == "tp_errors":
            scenario_tp_errors(*args)
        elif scenario == "register_after_shard":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model = tiny_gpt()
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            try:
                mdparam.register(model)
            except RuntimeError as e:
                if rank == 0:
                    (args[0] / "error.txt").write_text(str(e))
            registered = tiny_gpt()
            mdparam.register(registered)
            fully_shard(registered, mesh=init_device_mesh("cpu", (world,)))
            try:
                mdparam.load_plain(registered, tiny_gpt().state_dict())
            except RuntimeError as e:
                if rank == 0:
                    (args[0] / "load_error.txt").write_text(str(e))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Reached only when the scenario succeeded (an exception above goes to spawn's
    # error queue and exit code 1). Skipping interpreter finalisation avoids a rare
    # SIGABRT ("terminate called without an active exception") in gloo/DCP threads
    # torn down at exit, seen once in a full CI run after every result was written.
    os._exit(0)


def launch(scenario: str, *args, world: int = 2) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "rendezvous")
        torch.multiprocessing.spawn(
            worker, args=(world, store_path, scenario, list(args)), nprocs=world, join=True
        )
