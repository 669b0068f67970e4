import hashlib
import json
import os
import re
import shutil
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
from torch import nn

import export
import mdparam
import mdparam._convert
from examples.gpt import GPT
from export import convert
from export.convert import main as export_main
from mdparam._safetensors_read import read_header
from mdparam._safetensors_write import (
    DTYPE_NAMES,
    INDEX_NAME,
    pack_shards,
    remove_stale_temporaries,
    write_file,
    write_sharded,
)

REPO = Path(__file__).resolve().parents[1]

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
    registered_before = [e.name for e in mdparam.registered(model)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = mdparam.plain_state_dict(model)
    assert not any("parametrizations" in k for k in sd)
    assert set(sd) == set(fresh_plain(model).state_dict())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [e.name for e in mdparam.registered(model)] == registered_before


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


@pytest.mark.slow  # starts a process with a process group
def test_compiled_and_ddp_wrappers_are_seen_through():
    model, _ = trained()
    compiled = torch.compile(model)  # never called: only the names matter here
    sd = mdparam.plain_state_dict(compiled)
    assert set(sd) == set(fresh_plain(model).state_dict())
    script = textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from conftest import tiny_gpt
        import mdparam
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port
        model = tiny_gpt(); mdparam.register(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        sd = mdparam.plain_state_dict(ddp)
        plain = tiny_gpt(seed=5); plain.load_state_dict(sd, strict=True)
        x = torch.randint(0, 64, (2, 16))
        print("EQUAL", torch.equal(plain(x), ddp(x)))
        dist.destroy_process_group()
        """
    )
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
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


@pytest.mark.slow  # a writer process, killed mid-write
def test_a_killed_writer_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"previous")
    script = textwrap.dedent(
        f"""
        import time, torch
        from mdparam._safetensors_write import write_file
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


# --- the converter's two spellings: mdparam-export, and python -m export in a checkout ---


def test_the_converter_lives_in_the_package_and_export_is_not_installed():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["mdparam*"]
    target = project["project"]["scripts"]["mdparam-export"]
    module, _, func = target.partition(":")
    assert getattr(__import__(module, fromlist=[func]), func) is mdparam._convert.main
    # the checkout's export/ folder is only an entry point onto the same functions
    assert export.convert is mdparam._convert.convert and export_main is mdparam._convert.main


def test_the_mdparam_export_command_converts_outside_the_checkout(tmp_path):
    model = small_registered()
    mdparam.save_training(model, tmp_path / "train.safetensors")
    command = Path(sys.executable).parent / "mdparam-export"  # the installed console script
    out = subprocess.run(
        [str(command), "train.safetensors", "plain.safetensors"],
        cwd=tmp_path,  # not the repository: the installed package alone
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "mdparam-export: wrote plain.safetensors" in out.stderr
    plain = safetensors.torch.load_file(tmp_path / "plain.safetensors")
    reference = mdparam.plain_state_dict(model)
    assert set(plain) == set(reference) and all(torch.equal(plain[k], reference[k]) for k in plain)


# --- the converter never writes over its input ------------------------------------


def small_registered():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    mdparam.register(model)
    return model


def snapshot(root):
    """Every file under ``root`` (or ``root`` itself) with the hash of its bytes."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


ALIASES = {
    "same path": lambda p: p,
    "./ spelling": lambda p: Path(os.path.relpath(p.parent)) / "." / p.name,
    "symlink": lambda p: (p.parent / "alias").symlink_to(p.name) or p.parent / "alias",
    "hard link": lambda p: os.link(p, p.parent / "alias") or p.parent / "alias",
}


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("alias", list(ALIASES))
def test_converter_refuses_to_write_its_own_input_file(tmp_path, capsys, alias, force):
    train = mdparam.save_training(small_registered(), tmp_path / "train.safetensors")
    dst = ALIASES[alias](train)
    before = snapshot(tmp_path)
    rc = export_main([str(train), str(dst), "--quiet"] + ["--force"] * force)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"the output {dst} is " in err and "the input checkpoint" in err
    assert "write the output to another path" in err.lower()
    assert ("same file as" in err) == (alias in ("symlink", "hard link"))
    assert "already exists" not in err  # --force would not help: it is not offered
    assert snapshot(tmp_path) == before  # nothing replaced, no temporary left
    with pytest.raises(shutil.SameFileError, match="is the input checkpoint|same file as"):
        convert(train, dst, overwrite=True)
    # the directory that holds the input is refused too
    rc = export_main([str(train), str(tmp_path), "--quiet", "--force"])
    assert rc == 1 and "holds the input checkpoint" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_converter_refuses_to_write_into_its_own_sharded_input(tmp_path, capsys):
    src = tmp_path / "train"
    mdparam.save_training(small_registered(), src, max_shard_bytes=1500)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 2
    (tmp_path / "link").symlink_to("train")
    os.link(shards[1], tmp_path / "shard-link.safetensors")
    before = snapshot(tmp_path)
    cases = {
        src: "is the input checkpoint",
        src / ".." / "train": "is the input checkpoint",
        tmp_path / "link": "is the same file as the input checkpoint",
        shards[0]: "is a file of the input checkpoint",
        src / "model.safetensors.index.json": "is a file of the input checkpoint",
        tmp_path / "shard-link.safetensors": f"same file as {shards[1]}, a file of the input",
        tmp_path: "is a directory that holds the input checkpoint",
    }
    for dst, message in cases.items():
        assert export_main([str(src), str(dst), "--force", "--quiet"]) == 1, dst
        err = capsys.readouterr().err
        assert message in err and "write the output to another path" in err.lower(), err
        assert snapshot(tmp_path) == before, dst
    # a new directory beside it is fine
    assert export_main([str(src), str(tmp_path / "plain"), "--quiet"]) == 0


def test_python_dash_m_export_refuses_its_input_with_force(tmp_path):
    train = mdparam.save_training(small_registered(), tmp_path / "train.safetensors")
    before = snapshot(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "export", str(train), str(train), "--force"],
        cwd=REPO,  # python -m export is the checkout's entry point
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert f"python -m export: error: the output {train} is the input checkpoint" in out.stderr
    assert "Write the output to another path" in out.stderr and "Traceback" not in out.stderr
    assert snapshot(tmp_path) == before


# --- temporaries left by killed writers -----------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from mdparam._safetensors_write import write_file, write_sharded
    target, kind, ready, go = sys.argv[1:]
    def produce(name):  # t0 is handed to the writer thread, then t1 waits for "go"
        if name == "t1":
            Path(ready).touch()
            while not Path(go).exists():
                time.sleep(0.01)
        return torch.ones(1 << 20)
    specs = [(f"t{i}", torch.float32, (1 << 20,)) for i in range(3)]
    if kind == "file":
        write_file(target, specs, produce, overwrite=True)
    else:
        write_sharded(target, [specs[:1], specs[1:]], produce, overwrite=True)
    """
)


def temporaries(path):
    """What the writers of ``path`` leave beside it while they work: ``.NAME.XXXXXXXX.tmp``."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def start_writer(path, kind, tmp_path):
    """A writer of ``path`` in another process, stopped inside its write (a temporary exists)."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), kind, str(ready), str(go)], cwd=REPO
    )
    deadline = time.time() + 300
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the writer never reached its second tensor (exit {proc.poll()})")
        time.sleep(0.02)
    return proc, go


def age(path, seconds):
    """Set ``path``'s modification time ``seconds`` ago (negative: in the future)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.mark.slow  # a writer process, killed mid-write
@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_the_next_save_removes_what_a_killed_save_left(tmp_path, kind):
    work = tmp_path / "ckpt"
    work.mkdir()
    path = work / ("big.safetensors" if kind == "file" else "big")
    if kind == "file":
        path.write_bytes(b"previous")
    else:
        path.mkdir()
        (path / "old.txt").write_bytes(b"previous")
    before = snapshot(path)
    proc, _ = start_writer(path, kind, tmp_path)
    left = temporaries(path)
    proc.send_signal(signal.SIGKILL)  # mid-write: the writer is inside produce("t1")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert len(left) == 1 and temporaries(path) == left  # the kill left it behind
    assert left[0].is_dir() == (kind == "sharded")
    assert snapshot(path) == before  # the previous checkpoint is intact

    def save():
        model = small_registered()
        if kind == "file":
            return mdparam.save_plain(model, path, overwrite=True)
        return mdparam.save_training(model, path, overwrite=True, max_shard_bytes=1500)

    # Just written (its mtime is now, here pushed into the future so the test cannot race
    # the clock): it may belong to a writer that has not locked it yet, so it stays.
    age(left[0], -3600)
    save()
    assert temporaries(path) == left
    # Older than STALE_AFTER and unlocked: a dead writer's; the next save deletes it.
    age(left[0], 60)
    save()
    assert temporaries(path) == []
    assert sorted(p.name for p in work.iterdir()) == [path.name]
    if kind == "file":
        saved = safetensors.torch.load_file(path)  # the new file is complete
        reference = mdparam.plain_state_dict(small_registered())  # same seed, same weights
        assert set(saved) == set(reference) and all(
            torch.equal(saved[k], reference[k]) for k in saved
        )
    else:
        mdparam.load_training(small_registered(), path)  # the new sharded checkpoint is complete


def wait_for_first_tensor(tmp):
    """Wait until a file temporary holds its header and t0, so its mtime stays put."""
    deadline = time.time() + 120
    while True:
        size = tmp.stat().st_size
        if size >= 8 and size == 8 + struct.unpack("<Q", tmp.read_bytes()[:8])[0] + (4 << 20):
            return
        assert time.time() < deadline, "the writer never wrote its first tensor"
        time.sleep(0.02)


@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_a_live_writers_temporary_is_never_removed(tmp_path, kind):
    path = tmp_path / ("m.safetensors" if kind == "file" else "m")
    proc, go = start_writer(path, kind, tmp_path)
    try:
        (tmp,) = temporaries(path)
        if kind == "file":
            wait_for_first_tensor(tmp)
        # (sharded: the directory's entries no longer change while the writer waits)
        age(tmp, 3600)  # old, but locked by its living writer
        before = snapshot(tmp)
        assert remove_stale_temporaries(path) == []
        model = small_registered()  # a second writer of the same path
        if kind == "file":
            mdparam.save_plain(model, path, overwrite=True)
        else:
            mdparam.save_training(model, path, overwrite=True, max_shard_bytes=1500)
        assert temporaries(path) == [tmp] and snapshot(tmp) == before
        go.touch()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    # the last rename wins, with a complete checkpoint; nothing is left behind
    if kind == "file":
        loaded = safetensors.torch.load_file(path)
    else:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        loaded = {}
        for shard in sorted(set(index["weight_map"].values())):
            loaded.update(safetensors.torch.load_file(path / shard))
    assert sorted(loaded) == ["t0", "t1", "t2"]
    assert all(bool((t == 1).all()) for t in loaded.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["go", path.name, "ready"])


def test_only_unlocked_old_temporaries_of_that_path_are_removed(tmp_path):
    import fcntl

    path = tmp_path / "m.safetensors"

    def make(name, old=True, directory=False):
        p = tmp_path / name
        if directory:
            p.mkdir()
            (p / "shard.safetensors").write_bytes(b"x")
        else:
            p.write_bytes(b"x")
        age(p, 3600 if old else -3600)
        return p

    stale = make(".m.safetensors.abcd_123.tmp")
    stale_dir = make(".m.safetensors.zzzzzzzz.tmp", directory=True)
    locked = make(".m.safetensors.locked00.tmp")
    young = make(".m.safetensors.young000.tmp", old=False)
    kept = [
        locked,
        young,
        make(".m.safetensors.backup.tmp"),  # not a temporary's name: 6 characters
        make(".m.safetensors.x.abcdefgh.tmp"),  # the temporary of m.safetensors.x
        make(".other.safetensors.abcdefgh.tmp"),
        make("m.safetensors.abcdefgh.tmp"),
        make(".m.safetensors.abcdefgh.tmp.bak"),
    ]
    victim = make("victim")
    (tmp_path / ".m.safetensors.symlink0.tmp").symlink_to("victim")  # never followed
    holder = os.open(locked, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # as a writer holds it
        assert remove_stale_temporaries(path) == sorted([stale, stale_dir])
        assert all(p.exists() for p in kept) and victim.read_bytes() == b"x"
        assert (tmp_path / ".m.safetensors.symlink0.tmp").is_symlink()
    finally:
        os.close(holder)  # the writer is gone
    assert remove_stale_temporaries(path) == [locked]
    assert remove_stale_temporaries(path, min_age=-7200) == [young]


# --- what the hand-written writer produces, read by the safetensors library ------------

SHAPES = [(), (0,), (3, 0), (5,), (2, 3, 4)]  # a scalar, zero-element tensors, the usual


def sample(dtype, shape, seed):
    """A tensor of ``dtype`` and ``shape`` with varied values (not all zero)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g, dtype=dtype)


def written_tensors():
    """One tensor per (dtype the writer supports, shape), in a fixed order."""
    return {
        f"{DTYPE_NAMES[dtype]}.{i}": sample(dtype, shape, seed=7 * n + i)
        for n, dtype in enumerate(DTYPE_NAMES)
        for i, shape in enumerate(SHAPES)
    }


def assert_same(loaded, written):
    """Same names, dtypes and shapes, and bit-equal values (torch.equal on the bytes:
    float8 has no ==, and a NaN would not equal itself)."""
    assert set(loaded) == set(written)
    for name, t in written.items():
        got = loaded[name]
        assert (got.dtype, got.shape) == (t.dtype, t.shape), name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def specs_of(tensors):
    return [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


@pytest.mark.parametrize("metadata", [None, {}, {"run": "abc", "note": 'caf\u00e9 "quoted"'}])
def test_every_file_the_writer_produces_loads_with_the_library(tmp_path, metadata):
    tensors = written_tensors()
    assert {t.dtype for t in tensors.values()} == set(DTYPE_NAMES)  # every supported dtype
    path = tmp_path / "all.safetensors"
    write_file(path, specs_of(tensors), tensors.__getitem__, metadata)
    assert_same(safetensors.torch.load_file(path), tensors)
    with safetensors.safe_open(path, framework="pt") as f:
        assert (f.metadata() or {}) == (metadata or {})


@pytest.mark.parametrize("metadata", [None, {"run": "abc"}])
def test_every_sharded_checkpoint_the_writer_produces_loads_with_the_library(tmp_path, metadata):
    tensors = written_tensors()
    shards = pack_shards(specs_of(tensors), max_shard_bytes=64)
    assert len(shards) >= 3
    out = write_sharded(tmp_path / "ckpt", shards, tensors.__getitem__, metadata)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"] == (metadata or {})
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = safetensors.torch.load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        loaded.update(part)
        with safetensors.safe_open(out / shard, framework="pt") as f:
            assert (f.metadata() or {}) == (metadata or {})
    assert_same(loaded, tensors)


def test_a_failed_sharded_write_leaves_no_temporary(tmp_path):
    def produce(name):
        if name == "b":
            raise RuntimeError("disk on fire")
        return torch.zeros(4)

    specs = [("a", torch.float32, (4,)), ("b", torch.float32, (4,))]
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_sharded(tmp_path / "ckpt", [specs[:1], specs[1:]], produce)
    assert os.listdir(tmp_path) == []


def test_training_checkpoint_keeps_the_radius_taken_at_init(tmp_path):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 6))
    mdparam.register(a, radius="init")
    mdparam.save_training(a, tmp_path / "ckpt.safetensors")
    torch.manual_seed(1)
    b = nn.Sequential(nn.Linear(6, 6))  # a different init norm
    mdparam.register(b, radius="init")
    mdparam.load_training(b, tmp_path / "ckpt.safetensors")
    assert torch.equal(
        b[0].parametrizations.weight[0].radius, a[0].parametrizations.weight[0].radius
    )
    x = torch.randn(3, 6)
    assert torch.equal(a(x), b(x))
