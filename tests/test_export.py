import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import byte_batches, rel_err, tiny_gpt

import mdparam
from examples.gpt import GPT
from export import convert
from export.convert import main as export_main
from mdparam.safetensors_io import read_header, write_file

TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))


def trained(tie_head=False, tied="skip", steps=3, **register_kw):
    model = tiny_gpt(tie_head=tie_head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdparam.register(model, tied=tied, **register_kw)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=0.01))
    mdparam.Retraction(model, compile=False).attach(opt)
    for x, y in byte_batches(steps, 4, 16):
        model.loss(x % 64, y % 64).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def fresh_plain(model):
    return GPT(model.cfg)  # the user's own constructor, never registered


@pytest.mark.parametrize(("tie_head", "tied"), [(False, "skip"), (True, "skip"), (True, "share")])
def test_exported_file_loads_strictly_into_a_plain_model_with_equal_logits(
    tmp_path, tie_head, tied
):
    model, _ = trained(tie_head, tied)
    path = mdparam.save_plain(model, tmp_path / "model.safetensors")
    plain = fresh_plain(model)
    plain.load_state_dict(safetensors.torch.load_file(path), strict=True)  # the one line
    assert torch.equal(plain(TOKENS), model(TOKENS))  # same fuse, same kernels: bit-exact
    if tie_head:
        assert plain.head.weight is plain.tok.weight


@pytest.mark.parametrize(
    ("gains", "sphere", "gain_map", "radius"),
    [
        ("row", "row", "exp", "shape"),
        ("scalar", "flat", "identity", 3.0),
        ("none", "col", "softplus", "init"),
    ],
)
def test_export_covers_other_configurations(tmp_path, gains, sphere, gain_map, radius):
    model, _ = trained(gains=gains, sphere=sphere, gain_map=gain_map, radius=radius)
    plain = fresh_plain(model)
    plain.load_state_dict(mdparam.plain_state_dict(model), strict=True)
    assert torch.equal(plain(TOKENS), model(TOKENS))
    mdparam.save_training(model, tmp_path / "train.safetensors")
    convert(tmp_path / "train.safetensors", tmp_path / "plain.safetensors")
    plain2 = fresh_plain(model)
    plain2.load_state_dict(safetensors.torch.load_file(tmp_path / "plain.safetensors"), strict=True)
    assert torch.equal(plain2(TOKENS), model(TOKENS))


def test_plain_state_dict_leaves_the_model_untouched():
    model, _ = trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = mdparam.plain_state_dict(model)
    assert not any("parametrizations" in k for k in sd)
    assert set(sd) == set(fresh_plain(model).state_dict())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert mdparam.registered(model)


def test_save_plain_header_cast_and_metadata(tmp_path):
    model, _ = trained()
    path = mdparam.save_plain(
        model, tmp_path / "m.safetensors", dtype=torch.bfloat16, metadata={"run": "abc"}
    )
    meta, entries = read_header(path)
    assert meta["format"] == "pt" and meta["mdparam.kind"] == "plain"
    assert meta["mdparam.format_version"] == "1" and meta["mdparam.version"] == mdparam.__version__
    assert meta["run"] == "abc"
    assert set(json.loads(meta["mdparam.fused"])) == set(
        mdparam.registered(model)[i].name for i in range(len(mdparam.registered(model)))
    )
    assert all(e.dtype == torch.bfloat16 for e in entries.values())
    plain = fresh_plain(model).bfloat16()
    plain.load_state_dict(safetensors.torch.load_file(path), strict=True)
    assert rel_err(plain(TOKENS).float(), model(TOKENS)) < 0.05
    with pytest.raises(ValueError, match="reserved by mdparam"):
        mdparam.save_plain(model, tmp_path / "x.safetensors", metadata={"mdparam.kind": "x"})


def test_converter_output_equals_save_plain_tensor_for_tensor(tmp_path):
    model, _ = trained(tie_head=True, tied="share")
    mdparam.save_plain(model, tmp_path / "a.safetensors")
    mdparam.save_training(model, tmp_path / "train.safetensors")
    assert (
        export_main(
            [str(tmp_path / "train.safetensors"), str(tmp_path / "b.safetensors"), "--quiet"]
        )
        == 0
    )
    a = safetensors.torch.load_file(tmp_path / "a.safetensors")
    b = safetensors.torch.load_file(tmp_path / "b.safetensors")
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_header(tmp_path / "a.safetensors")[0] == read_header(tmp_path / "b.safetensors")[0]


def test_converter_reads_a_sharded_directory(tmp_path):
    model, _ = trained()
    mdparam.save_training(model, tmp_path / "train", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "train" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    convert(tmp_path / "train", tmp_path / "plain", dtype=torch.float16)
    out = json.loads((tmp_path / "plain" / "model.safetensors.index.json").read_text())
    sd = {}
    for shard in set(out["weight_map"].values()):
        sd.update(safetensors.torch.load_file(tmp_path / "plain" / shard))
    assert set(sd) == set(out["weight_map"])
    reference = mdparam.plain_state_dict(model, dtype=torch.float16)
    assert set(sd) == set(reference) and all(torch.equal(sd[k], reference[k]) for k in sd)
    # and the sharded training checkpoint resumes too
    other, _ = trained(steps=1)
    mdparam.load_training(other, tmp_path / "train")
    assert torch.equal(other(TOKENS), model(TOKENS))


def test_training_checkpoint_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model, opt = trained(steps=3)
    mdparam.save_training(model, tmp_path / "ckpt.safetensors")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    resumed = tiny_gpt(seed=7)
    mdparam.register(resumed)
    opt2 = torch.optim.AdamW(mdparam.param_groups(resumed, lr=0.02, gain_lr=0.01))
    mdparam.Retraction(resumed, compile=False).attach(opt2)
    mdparam.load_training(resumed, tmp_path / "ckpt.safetensors")
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))

    for m, o in ((model, opt), (resumed, opt2)):
        for x, y in byte_batches(3, 4, 16, seed=9):
            m.loss(x % 64, y % 64).backward()
            o.step()
            o.zero_grad()
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_plain_starts_from_the_pretrained_function(tmp_path):
    pretrained = tiny_gpt(seed=11)
    safetensors.torch.save_file(pretrained.state_dict(), tmp_path / "pre.safetensors")
    model = tiny_gpt(seed=12)
    mdparam.register(model)
    mdparam.load_plain(model, tmp_path / "pre.safetensors")
    assert rel_err(model(TOKENS), pretrained(TOKENS)) <= 1e-5
    d = model.blocks[0].attn.q.parametrizations.weight.original0
    assert float(d.detach().norm()) == pytest.approx(32**0.5, rel=1e-5)


def test_compiled_and_ddp_wrappers_are_seen_through():
    model, _ = trained()
    compiled = torch.compile(model)  # never called: only the names matter here
    sd = mdparam.plain_state_dict(compiled)
    assert set(sd) == set(fresh_plain(model).state_dict())
    script = textwrap.dedent(
        """
        import os, sys, torch, torch.distributed as dist
        sys.path.insert(0, "tests"); sys.path.insert(0, ".")
        from conftest import tiny_gpt
        import mdparam
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
        model = tiny_gpt(); mdparam.register(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        sd = mdparam.plain_state_dict(ddp)
        plain = tiny_gpt(seed=5); plain.load_state_dict(sd, strict=True)
        x = torch.randint(0, 64, (2, 16))
        print("EQUAL", torch.equal(plain(x), ddp(x)))
        dist.destroy_process_group()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "EQUAL True" in out.stdout, out.stderr


# --- atomic writes ----------------------------------------------------------


def test_failure_inside_the_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous")

    def produce(name):
        if name == "b":
            raise RuntimeError("disk on fire")
        return torch.zeros(4)

    specs = [("a", torch.float32, (4,)), ("b", torch.float32, (4,))]
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_file(path, specs, produce, overwrite=True)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_a_killed_writer_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"previous")
    script = textwrap.dedent(
        f"""
        import time, torch
        from mdparam.safetensors_io import write_file
        def produce(name):
            time.sleep(0.05)
            return torch.ones(1 << 20)
        specs = [(f"t{{i}}", torch.float32, (1 << 20,)) for i in range(400)]
        write_file({str(path)!r}, specs, produce, overwrite=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            tmps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            if tmps and tmps[0].stat().st_size > 8 << 20:  # well into the tensors
                break
            time.sleep(0.05)
        else:
            pytest.fail("the writer never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")] == [
        "big.safetensors"
    ]


# --- bad input ----------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    model, _ = trained()
    train = mdparam.save_training(model, tmp_path / "train.safetensors")
    plain = mdparam.save_plain(model, tmp_path / "plain.safetensors")
    return model, train, plain, tmp_path


def expect_error(args, match, dst):
    with pytest.raises((ValueError, OSError)) as info:
        convert(*args)
    assert info.match(match)
    assert not Path(dst).exists()


def test_converter_bad_inputs(files, capsys):
    _, train, plain, tmp = files
    out = tmp / "out.safetensors"
    expect_error((tmp / "nope.safetensors", out), r"nope\.safetensors does not exist", out)
    expect_error((plain, out), r"plain\.safetensors is a plain checkpoint.*mdparam.load_plain", out)
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(train.read_bytes()[:-100])
    expect_error(
        (truncated, out),
        r"truncated\.safetensors is not a complete safetensors file.*truncated",
        out,
    )
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    expect_error((garbage, out), "header is not JSON", out)
    foreign = tmp / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    expect_error((foreign, out), "no mdparam training header.*not a training checkpoint", out)
    meta, _ = read_header(train)
    future = tmp / "future.safetensors"
    sd = safetensors.torch.load_file(train)
    safetensors.torch.save_file(sd, future, metadata={**meta, "mdparam.format_version": "99"})
    expect_error((future, out), "format version '99'; this mdparam reads version '1'", out)
    broken = tmp / "broken.safetensors"
    safetensors.torch.save_file(sd, broken, metadata={**meta, "mdparam.tensors": "{"})
    expect_error((broken, out), "mdparam.tensors header is missing or malformed", out)
    expect_error(
        (train, tmp / "no" / "dir" / "out.safetensors"),
        "does not exist; create it first",
        tmp / "no",
    )
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert(train, out)
    assert out.read_bytes() == b"keep me"
    assert export_main([str(train), str(out), "--force", "--quiet"]) == 0
    # the command line prints the message, not a traceback
    assert export_main([str(plain), str(tmp / "x.safetensors"), "--quiet"]) == 1
    assert "export: error:" in capsys.readouterr().err


def test_library_bad_inputs(files):
    model, train, plain, tmp = files
    with pytest.raises(ValueError, match=r"training checkpoint.*mdparam.load_training"):
        mdparam.load_plain(model, train)
    with pytest.raises(ValueError, match=r"plain checkpoint.*mdparam.load_plain"):
        mdparam.load_training(model, plain)
    with pytest.raises(ValueError, match=r"call mdparam.register|Call mdparam.register"):
        mdparam.save_plain(tiny_gpt(), tmp / "unregistered.safetensors")
    assert not (tmp / "unregistered.safetensors").exists()
    with pytest.raises(ValueError, match="Call mdparam.register"):
        mdparam.load_plain(tiny_gpt(), plain)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mdparam.save_plain(model, plain)
    with pytest.raises(FileNotFoundError, match="create it first"):
        mdparam.save_plain(model, tmp / "missing" / "m.safetensors")
    # shape and name mismatches, checked before anything changes
    wider = tiny_gpt(n_embd=48)
    mdparam.register(wider)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"'tok.weight' has shape \(64, 32\), the model has \(64, 48\)"
    ):
        mdparam.load_plain(wider, plain)
    with pytest.raises(ValueError, match=r"has shape .*different architecture"):
        mdparam.load_training(wider, train)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    deeper = tiny_gpt(n_layer=3)
    mdparam.register(deeper)
    with pytest.raises(ValueError, match=r"does not match the model \(missing \['blocks.2"):
        mdparam.load_plain(deeper, plain)
    with pytest.raises(ValueError, match=r"does not match the model \(missing \['blocks.2"):
        mdparam.load_training(deeper, train)
    other = tiny_gpt()
    mdparam.register(other, gains="row")
    with pytest.raises(
        ValueError,
        match=r"gains=.rowcol. \(model: .row.\); register the model with the same options",
    ):
        mdparam.load_training(other, train)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mdparam.load_plain(model, tmp / "nope.safetensors")


def test_load_plain_refuses_weights_a_pure_sphere_cannot_hold():
    model = tiny_gpt()
    mdparam.register(model, gains="none", init="sphere")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'blocks.0.attn.q.weight'.*gains='none' cannot take up"):
        mdparam.load_plain(model, tiny_gpt(seed=3).state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
