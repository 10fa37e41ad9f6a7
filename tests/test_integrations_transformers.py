"""fusedloss.integrations.transformers on tiny random-init HF models (CPU): the patched training loss and
gradients against the unpatched model's in float64 (HF's own loss code is the oracle), eval / generate
unchanged, Trainer with gradient accumulation, revert, and the errors."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import assert_close  # noqa: E402

from fusedloss.integrations import transformers as fl_hf  # noqa: E402

V = 257  # odd on purpose
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (model class, config class, config overrides). The overrides make each family's specific
# logit transform matter at these tiny sizes (a softcap of 30 would never bite on random-init logits).
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            output_router_logits=True, router_aux_loss_coef=0.5)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=8)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=24, decoder_sparse_step=1,
                                                                 output_router_logits=True,
                                                                 router_aux_loss_coef=0.5)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=8)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=8, final_logit_softcapping=0.05)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=0.05)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=1, n_head=4, n_positions=64, resid_pdrop=0.0,
                                                    embd_pdrop=0.0, attn_pdrop=0.0)),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(logit_scale=4.0)),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(logits_scaling=0.25)),
}


def make_model(family, dtype=torch.float32, **overrides):
    model_cls, config_cls, extra = FAMILIES[family]
    kwargs = dict(COMMON) if family != "gpt2" else dict(vocab_size=V, bos_token_id=1, eos_token_id=2)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm has no float64, which the oracle runs in
    model = getattr(transformers, model_cls)(config).to(dtype)
    model.train()
    return model


def batch(b=2, t=11, ignore=True):
    ids = torch.randint(3, V, (b, t))
    labels = ids.clone()
    if ignore:
        labels[0, :4] = -100  # a prompt that is not scored
        labels[-1, -2:] = -100
    return ids, labels


def watched(model):
    """The gradients the tests compare: the LM head, the first layer's first weight, the embeddings."""
    layer = next(p for n, p in model.named_parameters() if ".0." in n and p.dim() == 2)
    return {"head": model.get_output_embeddings().weight, "layer0": layer,
            "embed": model.get_input_embeddings().weight}


def loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in watched(model).items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_hf_float64(family):
    """Patched float32 vs HF's own loss on the same model in float64: mean, num_items_in_batch and
    (Llama-like families) shift_labels; every family-specific transform set so that it matters."""
    model = make_model(family)
    ref = copy.deepcopy(model).double()
    fl_hf.apply(model)
    ids, labels = batch()
    cases = [dict(), dict(num_items_in_batch=torch.tensor(7))]
    for extra in cases:
        out, grads = loss_and_grads(model, input_ids=ids, labels=labels, **extra)
        ref_out, ref_grads = loss_and_grads(ref, input_ids=ids, labels=labels, **extra)
        assert out.logits is None
        assert out.loss.dtype == torch.float32
        assert_close(out.loss, ref_out.loss, torch.float32, "loss", f"{family} {extra}")
        for k in grads:
            assert_close(grads[k], ref_grads[k], torch.float32, "grad", f"{family} {extra} grad {k}")


def test_transform_and_aux_loss_are_in_the_loss():
    """The oracle above would not notice a transform both sides forgot: HF's loss differs from a plain
    cross-entropy of the head's logits here (softcap, scale, router aux loss), so the patch must apply it.
    Large initial weights make the logit transforms bite on every draw: at the default init the logits are
    about 0.1 and the gap between the two losses came within 1e-3 on some seeds."""
    for family in ("gemma2", "cohere", "granite", "mixtral"):
        model = make_model(family, **({} if family == "mixtral" else dict(initializer_range=1.0)))
        ids, labels = batch()
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            plain = torch.nn.functional.cross_entropy(model.get_output_embeddings()(hidden)[:, :-1].flatten(0, 1),
                                                      labels[:, 1:].flatten())
        fl_hf.apply(model)
        loss = model(input_ids=ids, labels=labels).loss
        assert abs(loss.item() - plain.item()) > 0.1, family


def test_shift_labels_and_logits_to_keep():
    model = make_model("llama")
    ref = copy.deepcopy(model).double()
    fl_hf.apply(model)
    ids, labels = batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    for kw in (dict(shift_labels=shift), dict(shift_labels=shift[:, -5:].contiguous(), logits_to_keep=5)):
        out, grads = loss_and_grads(model, input_ids=ids, labels=labels, **kw)
        ref_out, ref_grads = loss_and_grads(ref, input_ids=ids, labels=labels, **kw)
        assert_close(out.loss, ref_out.loss, torch.float32, "loss", str(list(kw)))
        for k in grads:
            assert_close(grads[k], ref_grads[k], torch.float32, "grad", f"{list(kw)} grad {k}")
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=5)


def head_oracle_loss(model, kw):
    """HF's loss in float64 from the hidden states that ``model``'s (unpatched) head receives: the oracle of
    the head alone, so that the trunk's 16-bit rounding, common to both runs, does not blur the comparison."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(**kw)
    hook.remove()
    z = seen[0].double() @ model.get_output_embeddings().weight.double().T
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    labels = kw["labels"]
    return torch.nn.functional.cross_entropy(z[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def assert_16bit_rule(out, grads, hf_out, hf_grads, oracle, ref_grads):
    """The 16-bit rule: the patched loss and gradients err against float64 (the head oracle for the
    loss, the float64 model for the gradients) at most 4x what HF's own 16-bit computation errs."""
    err = (out.loss.double() - oracle).abs().item()
    hf_err = (hf_out.loss.double() - oracle).abs().item()
    assert err <= 4 * hf_err + 1e-5, (err, hf_err)
    for k in grads:
        e = (grads[k].double() - ref_grads[k]).abs().max().item()
        h = (hf_grads[k].double() - ref_grads[k]).abs().max().item()
        assert e <= 4 * h + 1e-6 * ref_grads[k].abs().max().item(), (k, e, h)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bfloat16_16bit_rule(family):
    """bf16 model: the patched loss (against the float64 head on the same hidden states) and the gradients
    (against the float64 model) are no farther from their oracle than a small multiple of HF's own bf16
    error (HF rounds the logits to bf16 before its float32 upcast)."""
    model = make_model(family, torch.bfloat16)
    ref = copy.deepcopy(model).double()
    hf = copy.deepcopy(model)
    fl_hf.apply(model)
    ids, labels = batch(t=33)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    hf_out, hf_grads = loss_and_grads(hf, input_ids=ids, labels=labels)
    ref_out, ref_grads = loss_and_grads(ref, input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float32
    oracle = head_oracle_loss(hf, dict(input_ids=ids, labels=labels))
    assert_16bit_rule(out, grads, hf_out, hf_grads, oracle, ref_grads)


def test_autocast_bfloat16_16bit_rule():
    """Trainer's bf16=True: an fp32 model under autocast. The head runs in bf16 as autocast runs HF's
    nn.Linear, and the loss is as close to the float64 oracle as HF's own (a small multiple)."""
    model = make_model("llama")
    ref = copy.deepcopy(model).double()
    hf = copy.deepcopy(model)
    fl_hf.apply(model)
    ids, labels = batch(t=33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
        hf_out, hf_grads = loss_and_grads(hf, input_ids=ids, labels=labels)
        oracle = head_oracle_loss(hf, dict(input_ids=ids, labels=labels))
    ref_out, ref_grads = loss_and_grads(ref, input_ids=ids, labels=labels)
    assert_16bit_rule(out, grads, hf_out, hf_grads, oracle, ref_grads)


def test_eval_no_grad_generate_return_logits_unchanged():
    model = make_model("gemma2")
    ids, labels = batch()
    hf_train = model(input_ids=ids, labels=labels)
    model.eval()
    with torch.no_grad():
        hf_eval = model(input_ids=ids, labels=labels)
        hf_gen = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    fl_hf.apply(model, return_logits=True)
    assert torch.equal(model(input_ids=ids).logits, hf_eval.logits)  # eval, grad enabled, no labels
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        assert torch.equal(out.logits, hf_eval.logits) and torch.equal(out.loss, hf_eval.loss)
        assert torch.equal(model.generate(ids[:, :5], max_new_tokens=4, do_sample=False), hf_gen)
    model.train()
    out = model(input_ids=ids, labels=labels)  # return_logits=True: HF's (softcapped) logits as well
    assert torch.equal(out.logits, hf_train.logits)
    assert_close(out.loss, hf_train.loss, torch.float32, "loss")
    tup = model(ids, labels=labels, return_dict=False)
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.logits)


def test_revert_is_bit_identical():
    model = make_model("qwen3_moe")
    ids, labels = batch()
    before, grads_before = loss_and_grads(model, input_ids=ids, labels=labels)
    assert fl_hf.apply(model) is model and fl_hf.is_applied(model)
    loss_and_grads(model, input_ids=ids, labels=labels)
    fl_hf.revert(model)
    assert not fl_hf.is_applied(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    after, grads_after = loss_and_grads(model, input_ids=ids, labels=labels)
    assert torch.equal(before.loss, after.loss) and torch.equal(before.logits, after.logits)
    for k in grads_before:
        assert torch.equal(grads_before[k], grads_after[k]), k
    with fl_hf.applied(model):
        assert model(input_ids=ids, labels=labels).logits is None
    assert not fl_hf.is_applied(model)
    # Only this instance: another model of the same class is untouched.
    other = make_model("qwen3_moe")
    fl_hf.apply(model)
    assert other(input_ids=ids, labels=labels).logits is not None


def test_errors():
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, ffn_dim=32,
                                                             word_embed_proj_dim=16))
    with pytest.raises(NotImplementedError, match="OPTForCausalLM"):
        fl_hf.apply(opt)
    with pytest.raises(TypeError, match="model"):
        fl_hf.apply("llama")
    model = make_model("llama")
    with pytest.raises(TypeError, match="return_logits"):
        fl_hf.apply(model, return_logits=1)
    with pytest.raises(RuntimeError, match="not patched"):
        fl_hf.revert(model)
    fl_hf.apply(model)
    with pytest.raises(RuntimeError, match="already patched"):
        fl_hf.apply(model)
    fl_hf.revert(model)
    model.loss_function = lambda *a, **k: 0
    with pytest.raises(NotImplementedError, match="custom loss"):
        fl_hf.apply(model)
    bad_backend = make_model("llama")
    fl_hf.apply(bad_backend, backend="nope")
    with pytest.raises(ValueError, match="nope"):
        bad_backend(input_ids=batch()[0], labels=batch()[1])


def test_trainer_gradient_accumulation_and_evaluate(tmp_path):
    """Trainer.train() with gradient accumulation (so num_items_in_batch is passed) on uneven -100 masks:
    the same logged losses and final weights as the unpatched model; evaluate() and predict() run."""
    data = []
    for i in range(8):
        ids = torch.randint(3, V, (12,))
        labels = ids.clone()
        labels[: 1 + 2 * (i % 4)] = -100  # a different number of scored tokens per example
        data.append({"input_ids": ids, "labels": labels})

    def train(patch):
        torch.manual_seed(0)
        model = make_model("llama")
        if patch:
            fl_hf.apply(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patch)), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True,
            per_device_eval_batch_size=4, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        metrics = trainer.evaluate()
        pred = trainer.predict(data[:4])
        return losses, metrics, pred, model

    hf_losses, hf_metrics, hf_pred, hf_model = train(False)
    losses, metrics, pred, model = train(True)
    assert len(losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(hf_losses), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(metrics["eval_loss"], hf_metrics["eval_loss"], rtol=2e-5, atol=1e-5)
    assert pred.predictions.shape == hf_pred.predictions.shape == (4, 12, V)
    for (name, p), q in zip(model.named_parameters(), hf_model.parameters()):
        assert_close(p, q, torch.float32, "grad", name)  # weights after 2 SGD steps (Adam would amplify rounding)


def test_torch_compile_no_graph_break():
    """The patched training forward traces as one graph (the fused loss is a registered op with a fake)."""
    model = make_model("llama")
    fl_hf.apply(model)
    ids, labels = batch()
    eager = model(input_ids=ids, labels=labels).loss
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, labels=labels)
    assert out.logits is None
    assert_close(out.loss, eager, torch.float32, "loss")
    torch._dynamo.reset()


def test_core_never_imports_transformers():
    import subprocess
    import sys
    code = "import sys, fusedloss, fusedloss.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_hf_mode(tmp_path):
    from test_cli import TINY_DEMO, _log, run_cli

    out = run_cli("demo", "--hf", "llama", "--steps", "4", *TINY_DEMO, "--out", str(tmp_path), timeout=240)
    assert out.returncode == 0, _log(out)
    assert "demo: PASS" in out.stdout and "LlamaForCausalLM" in out.stdout
    assert "fusedloss apply(model)" in out.stdout and "transformers, unpatched" in out.stdout


def make_peft(modules_to_save=None, target_modules=("q_proj", "v_proj")):
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    # init_lora_weights=False: B is random rather than zero, so the adapters change the loss and every LoRA
    # matrix gets a gradient that depends on the head.
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=list(target_modules),
                             modules_to_save=modules_to_save, init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    if modules_to_save:
        with torch.no_grad():  # the trainable copy differs from the frozen original: which one ran shows in the loss
            head = model.get_base_model().lm_head
            head.modules_to_save["default"].weight.add_(torch.randn_like(head.original_module.weight))
    model.train()
    return model


def peft_loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["frozen", "modules_to_save"])
def test_peft_lora_matches_hf_float64(head):
    """A LoRA model (get_peft_model) with a frozen head (no weight gradient) or a ModulesToSaveWrapper head
    (its trainable copy gets the gradient, the frozen original none): loss and every gradient of the patched
    fp32 model equal the unpatched float64 model's; with the adapters disabled the original head runs."""
    mts = ["lm_head"] if head == "modules_to_save" else None
    model = make_peft(mts)
    ref = copy.deepcopy(model).double()
    # Both spellings: the PEFT model itself, or the transformers model inside it.
    target = model if head == "frozen" else model.base_model.model
    assert fl_hf.apply(target) is target
    assert fl_hf.is_applied(model) and fl_hf.is_applied(model.get_base_model())
    ids, labels = batch()
    out, grads = peft_loss_and_grads(model, ids, labels)
    ref_out, ref_grads = peft_loss_and_grads(ref, ids, labels)
    assert out.logits is None
    assert_close(out.loss, ref_out.loss, torch.float32, "loss", head)
    assert sorted(grads) == sorted(ref_grads)
    lora = [n for n in grads if "lora_" in n]
    head_grads = [n for n in grads if "lm_head" in n]
    assert len(lora) == 4
    assert head_grads == (["base_model.model.lm_head.modules_to_save.default.weight"] if mts else [])
    for n in grads:
        assert_close(grads[n], ref_grads[n], torch.float32, "grad", f"{head} {n}")
    if mts:
        with model.disable_adapter(), ref.disable_adapter():  # nothing is trainable then: no backward
            out = model(input_ids=ids, labels=labels)
            ref_out = ref(input_ids=ids, labels=labels)
        assert out.logits is None
        assert_close(out.loss, ref_out.loss, torch.float32, "loss", f"{head} adapters disabled")
    fl_hf.revert(model)
    assert not fl_hf.is_applied(target)
    leaves = [model.get_base_model().lm_head] if not mts else [model.get_base_model().lm_head.original_module,
                                                               model.get_base_model().lm_head.modules_to_save.default]
    assert all("forward" not in vars(m) for m in [model.get_base_model(), *leaves])


def test_peft_lora_on_the_head_is_refused():
    model = make_peft(target_modules=("q_proj", "lm_head"))
    with pytest.raises(NotImplementedError, match="LoRA"):
        fl_hf.apply(model)
    assert not fl_hf.is_applied(model)


@pytest.mark.parametrize("mode", ["fsdp2_apply_then_shard", "fsdp2_shard_then_apply", "fsdp1_head_own_unit"])
def test_fsdp_head_runs_inside_its_own_forward(mode, tmp_path, monkeypatch):
    """FSDP on CPU with gloo, one process (world_size=1), the head sharded as its own unit. FSDP gathers a
    unit's weight in its pre-forward hook and again, for backward, in a hook on the unit's outputs' gradient.
    So the fused loss must run inside lm_head's own forward (FSDP2: it sees the gathered weight, not the
    sharded DTensor) and the loss's gradient must pass through the head's output (FSDP1 fails in backward
    otherwise; FSDP2 silently skips the re-gather). Loss and every gradient equal the unpatched float64
    model's. (Two FSDP2 ranks also agree, but spawning them took 25-40 s here.)"""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch build has no torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.tensor import DTensor

    seen = []
    real = fl_hf.fusedloss.linear_cross_entropy

    def spy(h, weight, *args, **kwargs):
        seen.append(type(weight))
        return real(h, weight, *args, **kwargs)

    monkeypatch.setattr(fl_hf.fusedloss, "linear_cross_entropy", spy)
    model = make_model("llama", num_hidden_layers=2, tie_word_embeddings=False)
    ref = copy.deepcopy(model).double()
    head_output_grads = []

    def watch_output(module, inputs, output):  # returns None: a forward hook's return value replaces the output
        output.register_hook(head_output_grads.append)

    model.lm_head.register_forward_hook(watch_output)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        if mode == "fsdp1_head_own_unit":
            fl_hf.apply(model)
            layer_cls = type(model.model.layers[0])
            wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls, torch.nn.Linear}),
                                               device_id=torch.device("cpu"), use_orig_params=True)
            assert isinstance(model.lm_head, FullyShardedDataParallel)
        else:
            mesh = init_device_mesh("cpu", (1,))
            if mode == "fsdp2_apply_then_shard":
                fl_hf.apply(model)
            for module in (*model.model.layers, model.lm_head, model):
                fully_shard(module, mesh=mesh)
            if mode == "fsdp2_shard_then_apply":
                fl_hf.apply(model)
            assert isinstance(model.lm_head.weight, DTensor)
            wrapped = model
        ids, labels = batch()
        out = wrapped(input_ids=ids, labels=labels)
        out.loss.backward()
        ref_out, _ = loss_and_grads(ref, input_ids=ids, labels=labels)
        assert len(seen) == 1 and not issubclass(seen[0], DTensor), seen  # one fused call, on the gathered weight
        assert len(head_output_grads) == 1
        assert out.logits is None
        assert_close(out.loss, ref_out.loss, torch.float32, "loss", mode)
        ref_params = dict(ref.named_parameters())
        names = []
        for name, p in wrapped.named_parameters():
            name = name.replace("_fsdp_wrapped_module.", "")
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            assert_close(grad, ref_params[name].grad, torch.float32, "grad", f"{mode} grad {name}")
            names.append(name)
        assert sorted(names) == sorted(ref_params)
    finally:
        dist.destroy_process_group()
