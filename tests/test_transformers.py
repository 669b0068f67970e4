"""Hugging Face transformers round trips (optional: skipped without transformers)."""

import warnings

import pytest
import safetensors.torch
import torch
from conftest import rel_err, sphere_error

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import mdparam  # noqa: E402

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def tiny(arch, tie):
    config_cls, model_cls = ARCHS[arch]
    cfg = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return cfg, model_cls(cfg)


def train_a_few_steps(model, steps=3):
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=0.01))
    mdparam.Retraction(model).attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


X = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))


def register(model, *, warns_tied: bool, **kw) -> list[str]:
    """mdparam.register, asserting it warns about tied weights exactly when there are some."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = mdparam.register(model, **kw)
    warned = [w for w in caught if "left out tied weights" in str(w.message)]
    assert bool(warned) is warns_tied, [str(w.message) for w in caught]
    return names


def assert_round_trips(model, folder) -> transformers.PreTrainedModel:
    """save_pretrained, then from_pretrained with no mdparam: the same class and logits."""
    mdparam.save_pretrained(model, folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is type(model)
    model.eval()  # GPT-2 has dropout
    with torch.no_grad():
        assert rel_err(loaded(X).logits, model(X).logits) <= 1e-5
    return loaded


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tie", [False, True])
def test_registered_model_exports_a_folder_from_pretrained_loads(arch, tie, tmp_path):
    _, model = tiny(arch, tie)
    names = register(model, warns_tied=tie)
    assert ("lm_head.weight" in names) is (not tie)
    train_a_few_steps(model)
    loaded = assert_round_trips(model, tmp_path)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_checkpoint_loads_into_a_registered_model(arch, tie, tmp_path):
    _, pretrained = tiny(arch, tie)
    pretrained.save_pretrained(tmp_path)  # a tied model's file has no lm_head.weight
    _, model = tiny(arch, tie)
    torch.manual_seed(1)
    for p in model.parameters():  # a different starting point, to see the load take effect
        p.data.normal_(0, 0.05)
    register(model, warns_tied=tie)
    mdparam.load_plain(model, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert rel_err(model(X).logits, pretrained(X).logits) <= 1e-5


def test_tied_share_round_trip(tmp_path):
    _, model = tiny("llama", True)
    register(model, warns_tied=False, tied="share")
    assert (
        model.lm_head.parametrizations.weight.original0
        is model.model.embed_tokens.parametrizations.weight.original0
    )
    train_a_few_steps(model)
    assert_round_trips(model, tmp_path)


def test_gpt2_conv1d_and_moe_experts_register_and_round_trip(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    names = register(gpt2, warns_tied=True, layers="all", exclude=["*wte*", "*wpe*"])
    assert "transformer.h.0.attn.c_attn.weight" in names  # GPT-2's Conv1D
    assert "lm_head.weight" not in names  # tied to the excluded wte: stays plain
    train_a_few_steps(gpt2, steps=2)
    assert_round_trips(gpt2, tmp_path / "gpt2")

    moe_cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    moe = transformers.Qwen3MoeForCausalLM(moe_cfg)
    before = moe(X).logits
    names = register(moe, warns_tied=False, layers="all", exclude="*embed_tokens*")
    assert any(n.endswith("experts.gate_up_proj") for n in names), names
    with torch.no_grad():
        assert rel_err(moe(X).logits, before) <= 1e-5
    train_a_few_steps(moe, steps=2)
    assert_round_trips(moe, tmp_path / "moe")


def test_trainer_recipe(tmp_path):
    """transformers.Trainer with mdparam's optimizer groups and the retraction after each step."""
    pytest.importorskip("accelerate")
    _, model = tiny("llama", False)
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=0.01))
    mdparam.Retraction(model).attach(opt)  # Trainer calls opt.step(); the hook retracts
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=g)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, sched)
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert sphere_error(model) <= 1e-5
    safetensors.torch.save_file(mdparam.plain_state_dict(model), tmp_path / "plain.safetensors")
    plain = type(model)(model.config)  # the trained weights serve a plain model
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "plain.safetensors"), strict=True)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert rel_err(plain(ids).logits, model(ids).logits) <= 1e-5


# --- transformers.Trainer ------------------------------------------------------------------


class _SphereEveryStep(transformers.TrainerCallback):
    """Records, after every optimizer step, how far the directions are from their spheres."""

    def __init__(self, model):
        self.model, self.errors = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.errors.append(sphere_error(self.model))


def _trainer_run(out, resume=None, steps=6):
    _, model = tiny("llama", tie=False)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(32):
        ids = torch.randint(0, 64, (12,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=1e-3))
    mdparam.Retraction(model).attach(opt)  # Trainer's optimizer.step() then retracts
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 8)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    callback = _SphereEveryStep(model)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, sched), callbacks=[callback]
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, callback


def test_trainer_retracts_every_step_resumes_exactly_and_exports(tmp_path):
    import json
    import subprocess
    import sys

    full, seen = _trainer_run(tmp_path / "run")
    assert len(seen.errors) == 6 and max(seen.errors) <= 1e-5  # on the sphere after every step
    assert {"optimizer.pt", "scheduler.pt", "model.safetensors"} <= {
        p.name for p in (tmp_path / "run" / "checkpoint-4").iterdir()
    }
    resumed, seen2 = _trainer_run(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-4"))
    assert len(seen2.errors) == 2 and max(seen2.errors) <= 1e-5  # steps 5 and 6 only
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # Trainer's own checkpoint resumes bitwise
    # save_pretrained -> from_pretrained in a process where mdparam cannot be imported
    mdparam.save_pretrained(full, tmp_path / "export")
    with torch.no_grad():
        want = full(input_ids=X).logits
    script = (
        "import sys, json, torch; sys.modules['mdparam'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'export')!r})\n"
        f"x = torch.tensor({X.tolist()})\n"
        "print(json.dumps(m(input_ids=x).logits.tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert rel_err(got, want) <= 1e-5
