"""kdfast.integrations.transformers / .trl on tiny randomly initialised models built from configs
(no download): the fused loss and every student gradient equal the materialised path
(``model(...).logits`` + kdfast's reference loss), for Llama, Qwen2, Gemma2 (final softcap),
GPT-2 (tied embeddings, biased attention), Cohere (logit scale) and Granite (logits divisor); the
sparse (top-k) teacher; the KDTrainer trains; the fused path saves less for backward than the
materialised one; TRL's DistillationTrainer / GKDTrainer give the same loss and gradients with
kdfast's loss as with their own; the example runs in its quick mode."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kdfast

transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers "
                                                          "(the `test` extra installs it)")
from kdfast.integrations.transformers import (KDTrainer, causal_lm_distillation_loss, output_head,  # noqa: E402
                                              teacher_topk, verify_output_head)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96


def _config(arch: str, hidden: int, **extra):
    """A one-layer config of ``arch`` at ``hidden`` width; weights large enough (init 0.2) that the
    logits are O(1) and the divergences and gradients are far from zero."""
    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **common, **extra)
    llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, **common)
    if arch == "gemma2":
        return transformers.Gemma2Config(**llama_like, head_dim=16, final_logit_softcapping=1.5, **extra)
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "cohere": transformers.CohereConfig, "granite": transformers.GraniteConfig}[arch](**llama_like, **extra)


EXTRA = {"cohere": dict(logit_scale=0.5), "granite": dict(logits_scaling=2.0)}


def _models(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    extra = EXTRA.get(arch, {})
    student = transformers.AutoModelForCausalLM.from_config(_config(arch, 32, **extra))
    teacher = transformers.AutoModelForCausalLM.from_config(_config(arch, 48, **extra))
    return student.float(), teacher.float().requires_grad_(False)


def _batch(batch=3, seq=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, seq - 4:] = 0          # right padding
    mask[2, :3] = 0                # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100           # a prompt that does not count
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _materialised(student, teacher, batch, **options):
    """The truth: both models' logits, shifted as transformers does, and kdfast's reference loss."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    student_logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1]
    return kdfast.divergence_loss(student_logits, teacher_logits, batch["labels"][:, 1:], backend="reference",
                                  **options)


def _assert_same_loss_and_grads(student, fused, reference):
    student.zero_grad(set_to_none=True)
    fused_loss = fused()
    fused_loss.backward()
    fused_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    reference_loss = reference()
    reference_loss.backward()
    reference_grads = _grads(student)
    torch.testing.assert_close(fused_loss, reference_loss, rtol=1e-5, atol=1e-7)
    assert set(fused_grads) == {n for n, p in student.named_parameters() if p.requires_grad}
    assert fused_grads.keys() == reference_grads.keys()
    for name in reference_grads:
        torch.testing.assert_close(fused_grads[name], reference_grads[name], rtol=1e-4, atol=1e-7,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    return fused_loss


CASES = [("llama", dict(divergence="forward_kl", temperature=2.0, alpha=0.7)),
         ("qwen2", dict(divergence="jsd", beta=0.3, temperature=1.0, alpha=1.0)),
         ("gemma2", dict(divergence="reverse_kl", temperature=1.5, alpha=0.5)),
         ("gpt2", dict(divergence="jsd", beta=0.5, temperature=1.0, alpha=0.8)),
         ("cohere", dict(divergence="tvd", temperature=1.0, alpha=0.9)),
         ("granite", dict(divergence="skew_forward_kl", temperature=1.0, alpha=1.0))]


@pytest.mark.parametrize("arch, options", CASES, ids=[c[0] for c in CASES])
def test_loss_and_every_student_gradient_equal_the_materialised_path(arch, options):
    student, teacher = _models(arch)
    batch = _batch()
    head = output_head(student)
    if arch == "gemma2":
        assert head.softcap == 1.5
    if arch == "gpt2":  # tied: the head's weight is the token embedding, which gets both gradients
        assert head.weight is student.transformer.wte.weight
    if arch == "cohere":
        assert head.logit_scale == 0.5
    if arch == "granite":
        assert head.logit_scale == 0.5
    for model in (student, teacher):
        verify_output_head(model, batch)
    loss = _assert_same_loss_and_grads(
        student, lambda: causal_lm_distillation_loss(student, teacher, batch, **options),
        lambda: _materialised(student, teacher, batch, **options))
    assert loss.item() > 1e-3


def test_num_items_in_batch_shift_labels_and_chunks():
    student, teacher = _models("llama")
    batch = _batch()
    num_items = torch.tensor(40)
    _assert_same_loss_and_grads(
        student, lambda: causal_lm_distillation_loss(student, teacher, batch, divergence="mixed_kl",
                                                     num_items_in_batch=num_items, chunk_size=8),
        lambda: _materialised(student, teacher, batch, divergence="mixed_kl", num_items_in_batch=num_items))
    # shift_labels (already shifted, e.g. from a padding-free collator) are used as given
    shifted = dict(batch, shift_labels=torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100))
    del shifted["labels"]
    torch.testing.assert_close(causal_lm_distillation_loss(student, teacher, shifted),
                               causal_lm_distillation_loss(student, teacher, batch))


def test_no_labels_means_input_ids_without_padding_and_the_teacher_stays_frozen():
    student, teacher = _models("qwen2")
    teacher.train()
    batch = _batch()
    loss = causal_lm_distillation_loss(student, teacher, dict(input_ids=batch["input_ids"],
                                                              attention_mask=batch["attention_mask"]))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    expected = _materialised(student, teacher, dict(batch, labels=labels))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert teacher.training  # put back as it was; its forward ran in eval mode
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("tail, divergence", [("renormalize", "forward_kl"), ("bucket", "jsd")])
def test_sparse_teacher_equals_the_materialised_topk_loss(tail, divergence):
    student, teacher = _models("gemma2")
    batch = _batch()
    indices, logprobs = teacher_topk(teacher, batch, k=8)
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits.float(), -1)
    torch.testing.assert_close(logprobs, full.topk(8, dim=-1).values, rtol=1e-5, atol=1e-6)
    sparse = dict(batch, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs)
    options = dict(divergence=divergence, tail=tail, alpha=0.6)

    def reference():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return kdfast.topk_divergence_loss(logits, indices[:, :-1], logprobs[:, :-1], batch["labels"][:, 1:],
                                           backend="reference", **options)

    _assert_same_loss_and_grads(student, lambda: causal_lm_distillation_loss(student, None, sparse, **options),
                                reference)


def test_clear_errors():
    student, teacher = _models("llama")
    batch = _batch()
    with pytest.raises(ValueError, match="teacher is None"):
        causal_lm_distillation_loss(student, None, batch)
    with pytest.raises(ValueError, match="both a teacher model and a sparse teacher"):
        causal_lm_distillation_loss(student, teacher, dict(batch, teacher_topk_indices=batch["input_ids"][..., None],
                                                           teacher_topk_logprobs=torch.zeros(3, 12, 1)))
    odd = copy.deepcopy(student)
    odd.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises((TypeError, ValueError), match="student"):
        causal_lm_distillation_loss(odd, teacher, batch)
    no_backbone = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no output embeddings|backbone"):
        causal_lm_distillation_loss(no_backbone, teacher, batch)
    wrong = copy.deepcopy(teacher)
    wrong.config.final_logit_softcapping = 0.5  # a config that says softcap, a forward that does not
    with pytest.raises(ValueError, match="differ from model"):
        verify_output_head(wrong, batch, "teacher")


# ---------------------------------------------------------------------------------- memory


def _saved_bytes(step):
    """Bytes of the tensors autograd saves for backward during ``step()`` (counted once each)."""
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total[0]


def test_fused_path_saves_less_than_the_materialised_logits():
    torch.manual_seed(0)
    config = dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(config, hidden_size=64)))
    teacher.requires_grad_(False)
    ids = torch.randint(0, 4096, (2, 128))
    batch = dict(input_ids=ids, labels=ids)
    fused = _saved_bytes(lambda: causal_lm_distillation_loss(student, teacher, batch, divergence="jsd"))
    materialised = _saved_bytes(lambda: _materialised(student, teacher, dict(batch, attention_mask=torch.ones_like(ids)),
                                                      divergence="jsd"))
    logits_bytes = ids.numel() * 4096 * 4
    # the materialised path keeps at least one [tokens, vocab] fp32 tensor more than the fused one
    assert fused + logits_bytes <= materialised, (fused, materialised)


# ---------------------------------------------------------------------------------- trainers


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=16, seed=0):
        generator = torch.Generator().manual_seed(seed)
        # a learnable pattern: each token is the previous one + 1 (mod VOCAB), from a random start
        start = torch.randint(0, VOCAB, (n, 1), generator=generator)
        self.ids = (start + torch.arange(seq)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], attention_mask=torch.ones_like(self.ids[i]), labels=self.ids[i])


def _args(tmp_path, **extra):
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                                          max_steps=12, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, bf16=False, seed=0, **extra)


def test_kd_trainer_steps_lower_the_loss_and_keep_the_teacher_frozen(tmp_path):
    student, teacher = _models("llama")
    # a teacher that knows the pattern a little: a few CE steps of its own
    teacher.requires_grad_(True)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    data = _Sequences()
    for _ in range(20):
        ids = data.ids
        loss = teacher(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = KDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, gradient_accumulation_steps=2),
                        train_dataset=data, eval_dataset=_Sequences(8, seed=1), divergence="jsd", beta=0.5,
                        alpha=0.5)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = trainer.evaluate()["eval_loss"]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert after < 0.8 * before, (before, after, losses)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, frozen[key])


def test_kd_trainer_loss_is_the_function_with_num_items_in_batch(tmp_path):
    student, teacher = _models("qwen2")
    trainer = KDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=_Sequences(),
                        divergence="forward_kl", temperature=2.0, loss_options=dict(chunk_size=16))
    batch = _batch()
    loss = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(30))
    expected = _materialised(student, teacher, batch, temperature=2.0, num_items_in_batch=30)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="loss_options"):
        KDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), loss_options=dict(tempreature=2.0))


# ---------------------------------------------------------------------------------- TRL


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def _trl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl", reason="the TRL helper's tests need trl (the `test` extra installs it)")
    datasets = pytest.importorskip("datasets")
    from kdfast.integrations.trl import with_kdfast_loss
    return datasets, with_kdfast_loss


def _compare_trainers(ours, theirs, call):
    for trainer in (theirs, ours):
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
    their_loss, our_loss = call(theirs), call(ours)
    their_loss.backward()
    our_loss.backward()
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-7)
    theirs_grads, ours_grads = _grads(theirs.model), _grads(ours.model)
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    for name in theirs_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], rtol=1e-4, atol=1e-7,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_trl_distillation_trainer_loss_and_grads(tmp_path):
    datasets, with_kdfast_loss = _trl()
    from trl import DistillationConfig, DistillationTrainer
    student, teacher = _models("gemma2")
    prompts = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"]})
    args = DistillationConfig(output_dir=str(tmp_path), beta=0.3, temperature=1.5, report_to=[], use_cpu=True,
                              bf16=False, max_completion_length=8, per_device_train_batch_size=2)
    theirs = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                 processing_class=_tokenizer())
    ours = with_kdfast_loss(DistillationTrainer)(model=copy.deepcopy(student), teacher_model=teacher, args=args,
                                                 train_dataset=prompts, processing_class=_tokenizer())
    assert isinstance(ours, DistillationTrainer) and type(ours).__name__ == "KDFastDistillationTrainer"
    generator = torch.Generator().manual_seed(3)
    inputs = dict(prompt_ids=torch.randint(3, VOCAB, (2, 5), generator=generator),
                  prompt_mask=torch.ones(2, 5, dtype=torch.long),
                  completion_ids=torch.randint(3, VOCAB, (2, 7), generator=generator),
                  completion_mask=torch.ones(2, 7, dtype=torch.long))
    inputs["prompt_mask"][0, :2] = 0       # left-padded prompt
    inputs["completion_mask"][1, 5:] = 0   # a completion that ended early
    # no generation: the loss of one prepared batch, as the trainer's training step computes it
    _compare_trainers(ours, theirs, lambda trainer: trainer.compute_loss(trainer.model, dict(inputs)))
    with_items = dict(inputs, num_items_in_batch=torch.tensor(20.0))
    _compare_trainers(ours, theirs, lambda trainer: trainer.compute_loss(trainer.model, dict(with_items)))


def test_trl_gkd_trainer_loss_and_grads(tmp_path):
    datasets, with_kdfast_loss = _trl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    student, teacher = _models("llama")
    chats = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "w1"},
                                                      {"role": "assistant", "content": "w2"}]]})
    # lmbda=0, seq_kd=False: no on-policy or teacher generation, the dataset's sequences are used
    args = GKDConfig(output_dir=str(tmp_path), beta=0.4, lmbda=0.0, seq_kd=False, temperature=0.9, report_to=[],
                     use_cpu=True, bf16=False, per_device_train_batch_size=2)
    theirs = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=chats,
                        processing_class=_tokenizer())
    ours = with_kdfast_loss(GKDTrainer)(model=copy.deepcopy(student), teacher_model=teacher,
                                        args=copy.deepcopy(args), train_dataset=chats, processing_class=_tokenizer())
    batch = _batch()
    _compare_trainers(ours, theirs, lambda trainer: trainer.compute_loss(trainer.model, dict(batch)))
    _compare_trainers(ours, theirs, lambda trainer: trainer.compute_loss(trainer.model, dict(batch),
                                                                         num_items_in_batch=torch.tensor(25)))
    with pytest.raises(TypeError, match="DistillationTrainer or GKDTrainer"):
        with_kdfast_loss(transformers.Trainer)


# ---------------------------------------------------------------------------------- example


def test_example_quick(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "distill_hf.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "perplexity" in done.stdout and "peak" in done.stdout


# --- FSDP2 ----------------------------------------------------------------------------------------

def _fsdp_llama(tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config).requires_grad_(False)
    tokens = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    return student, teacher, dict(input_ids=tokens, labels=tokens.clone())


def _fsdp_sgd_step(student, teacher, batch):
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    loss = causal_lm_distillation_loss(student, teacher, batch, alpha=0.5)
    loss.backward()
    optimizer.step()
    return float(loss)


def _fsdp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for tied in (False, True):
            student, teacher, batch = _fsdp_llama(tied)
            single = copy.deepcopy(student)
            single_loss = _fsdp_sgd_step(single, teacher, batch)
            for model in (student, teacher):
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model.model)
                fully_shard(model)
            rows = slice(rank * 2, rank * 2 + 2)
            try:
                loss = _fsdp_sgd_step(student, teacher, {k: v[rows] for k, v in batch.items()})
            except ValueError as error:
                results[tied] = dict(error=str(error))
                continue
            losses = [None] * world
            dist.all_gather_object(losses, loss)
            error = max(float((p.full_tensor() - q).abs().max()) for p, q in zip(student.parameters(), single.parameters()))
            results[tied] = dict(mean_loss=sum(losses) / world, single_loss=single_loss, param_error=error)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out_file)


def test_fsdp2_student_step_equals_one_process(tmp_path):
    """A fully_shard-ed Llama (layers, backbone, root) distilled with causal_lm_distillation_loss on
    2 gloo processes takes the single-process SGD step: the untied LM head is a DTensor outside any
    forward, gathered once and its gradient reduce-scattered. A tied head that fully_shard split from
    the embeddings raises instead of training two copies."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_file = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    results = torch.load(out_file)
    untied = results[False]
    assert untied["mean_loss"] == pytest.approx(untied["single_loss"], rel=1e-6)
    assert untied["param_error"] < 1e-6
    assert "tie_word_embeddings" in results[True]["error"]
