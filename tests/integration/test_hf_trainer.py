"""Hugging Face `Trainer` driving RemoteAdam: `optimizers=(RemoteAdam, get_linear_schedule_with_warmup)`,
bf16 autocast, gradient accumulation, gradient clipping (Trainer's default max_grad_norm=1.0),
checkpoints and resume_from_checkpoint onto fresh and onto still-running shards, two workers on the
same shards.

The model is a tiny GPT-2 built from a config (no downloads), the data 64 random sequences in
memory. With torch's math (eps=1e-8, optimized_update=False, weight_decouple=True) RemoteAdam must
give bitwise the weights torch.optim.AdamW(fused=True) gives under the same Trainer run.

Trainer's order on train(resume_from_checkpoint=ckpt) (transformers 5.24, accelerate 1.15), which
RemoteAdam has to survive: the optimizer is built by the user before train(); train() loads the
checkpoint's weights into the model in place (trainer.py:1564 -> _load_from_checkpoint,
model.load_state_dict at :3702); accelerator.prepare wraps the optimizer in AcceleratedOptimizer,
whose __init__ calls opt.load_state_dict(opt.state_dict()) (accelerate/optimizer.py:70-75, from
trainer.py:1773); then optimizer.pt is loaded (trainer.py:1817 -> opt.load_state_dict at :3989) and
scheduler.pt.
"""
from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments,
                          get_linear_schedule_with_warmup)

from integration_helpers import assert_same, params_of, shard_steps, shard_values

from optserve import RemoteAdam
from optserve.server.main import run_server


LR = 5e-3
WEIGHT_DECAY = 0.01
BATCH, ACCUM, SEQ, N_SAMPLES = 4, 2, 16, 64  # 8 samples per optimizer step: 8 steps per epoch


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 64, (N_SAMPLES, SEQ), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def groups(model, named: bool):
    """HF's default grouping: weight decay on matrices, none on biases and LayerNorms."""
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    pick = (lambda ps: ps) if named else (lambda ps: [p for _, p in ps])
    return [{"params": pick(decay), "weight_decay": WEIGHT_DECAY}, {"params": pick(no_decay), "weight_decay": 0.0}]


def torch_adamw(model):
    # fused=True: the shards run torch's fused Adam kernel, so this is the run RemoteAdam equals bitwise.
    # torch's own for-loop/foreach AdamW differs from its fused one by an ulp at step 2 here, which
    # Adam's normalisation grows to 1.3e-5 by step 8 (3.7e-6 without bf16): no tolerance would be
    # meaningful across the two, while fused against RemoteAdam is exact.
    return torch.optim.AdamW(groups(model, named=False), lr=LR, eps=1e-8, fused=True)


def remote_adamw(servers, **options):
    def make(model):
        return RemoteAdam(groups(model, named=True), servers, lr=LR, eps=1e-8, optimized_update=False,
                          weight_decouple=True, **options)
    return make


def run(out_dir, make_optimizer, *, max_steps=8, save_steps=None, resume=None, model_seed=0, callbacks=(),
        bf16=True, max_grad_norm=1.0):
    """One Trainer run; returns (trainer, model, optimizer). A resumed run starts from a model of
    another seed, so it ends right only if the checkpoint's weights reach the shards."""
    model = tiny_gpt2(model_seed)
    opt = make_optimizer(model)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=max_steps)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, bf16=bf16, use_cpu=True, report_to="none", max_grad_norm=max_grad_norm,
        dataloader_num_workers=0, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 10_000,
        logging_strategy="no", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, sched),
                      callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, model, opt


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """torch.optim.AdamW for 8 steps, checkpoint at 4, and the same run resumed from step 4. The
    resumed run equals the uninterrupted one bitwise: Trainer's resume is exact, so whatever differs
    below comes from RemoteAdam."""
    out = tmp_path_factory.mktemp("torch")
    _, model, _ = run(out / "full", torch_adamw, save_steps=4)
    _, resumed, _ = run(out / "resumed", torch_adamw, resume=out / "full" / "checkpoint-4", model_seed=1)
    full = params_of(model)
    assert_same(params_of(resumed), full, what="torch AdamW resumed vs uninterrupted")
    return full


@pytest.fixture
def remote_full_run(tmp_path):
    """RemoteAdam for 8 steps on one in-process shard, checkpoint at step 4; the shard stays up."""
    with run_server() as address:
        _, model, opt = run(tmp_path / "full", remote_adamw([address]), save_steps=4)
        yield address, params_of(model), tmp_path / "full" / "checkpoint-4"
        opt.close()


def test_trainer_bf16_accumulation_matches_torch_adamw(remote_full_run, torch_reference):
    address, weights, _ = remote_full_run

    assert_same(weights, torch_reference, what="RemoteAdam vs torch AdamW(fused=True)")
    assert_same(shard_values([address]), weights, what="shard vs the worker's model")
    assert set(shard_steps([address]).values()) == {8}  # one Adam step per optimizer step, accumulation included


def test_resume_onto_fresh_shards_ends_where_the_uninterrupted_run_ends(remote_full_run, tmp_path):
    _, weights, checkpoint = remote_full_run
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # plain data only
    assert {int(s["step"]) for s in saved["state"].values()} == {4}

    with run_server() as fresh:
        _, model, opt = run(tmp_path / "resumed", remote_adamw([fresh]), resume=checkpoint, model_seed=1)
        opt.close()
        assert_same(params_of(model), weights, what="resumed on fresh shards vs uninterrupted")
        assert set(shard_steps([fresh]).values()) == {8}


def test_resume_onto_the_running_shards_with_init_model(remote_full_run, tmp_path):
    address, weights, checkpoint = remote_full_run
    assert set(shard_steps([address]).values()) == {8}  # the shards are past the checkpoint

    _, model, opt = run(tmp_path / "resumed", remote_adamw([address], init="model"), resume=checkpoint,
                        model_seed=1)
    opt.close()

    assert_same(params_of(model), weights, what="resumed on the running shards vs uninterrupted")
    assert_same(shard_values([address]), weights, what="shard after the resumed run")
    assert set(shard_steps([address]).values()) == {8}


def test_resume_onto_the_running_shards_without_init_model_is_refused_and_changes_nothing(remote_full_run,
                                                                                             tmp_path):
    """Loading the step-4 optimizer.pt onto shards at step 8 would roll them back: refused."""
    address, weights, checkpoint = remote_full_run

    with pytest.raises((ValueError, RuntimeError), match=r"init=.model"):
        run(tmp_path / "resumed", remote_adamw([address]), resume=checkpoint, model_seed=1)

    assert_same(shard_values([address]), weights, what="shard after the refused resume")
    assert set(shard_steps([address]).values()) == {8}


class _AtStep(TrainerCallback):
    """Calls fn() once, at the end of optimizer step `step`."""

    def __init__(self, step, fn):
        self.step, self.fn = step, fn

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.fn()


class _AtTrainBegin(TrainerCallback):
    """Calls fn() once everything is prepared (after accelerator.prepare), before the first step."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_begin(self, args, state, control, **kwargs):
        self.fn()


def test_second_worker_joining_does_not_roll_the_shards_back(tmp_path):
    """Worker A trains 10 steps; worker B builds its RemoteAdam (adopting step 10); A trains 20
    more; then B's Trainer starts. accelerate's AcceleratedOptimizer calls
    opt.load_state_dict(opt.state_dict()) on B, whose model still holds step 10's values: the
    shards must keep A's step-30 values."""
    with run_server() as address:
        joined = {}

        def b_joins():
            joined["a_at_10"] = params_of(a_model)
            joined["b_model"] = b_model = tiny_gpt2(seed=2)
            joined["b_opt"] = remote_adamw([address])(b_model)  # init="shard": adopts the shards' step 10
            joined["b_at_join"] = params_of(b_model)

        a_model = None

        def make_a(model):
            nonlocal a_model
            a_model = model
            return remote_adamw([address])(model)

        _, _, a_opt = run(tmp_path / "a", make_a, max_steps=30, callbacks=[_AtStep(10, b_joins)])
        a_opt.close()
        a_final = params_of(a_model)
        assert set(shard_steps([address]).values()) == {30}
        assert_same(joined["b_at_join"], joined["a_at_10"], what="B at join vs A at step 10")

        at_b_start = {}

        def b_starts():
            at_b_start["values"] = shard_values([address])
            at_b_start["steps"] = shard_steps([address])

        b_model, b_opt = joined["b_model"], joined["b_opt"]
        sched = get_linear_schedule_with_warmup(b_opt, num_warmup_steps=0, num_training_steps=2)
        args = TrainingArguments(output_dir=str(tmp_path / "b"), max_steps=2, per_device_train_batch_size=BATCH,
                                 gradient_accumulation_steps=ACCUM, bf16=True, use_cpu=True, report_to="none",
                                 dataloader_num_workers=0, save_strategy="no", logging_strategy="no", seed=0,
                                 disable_tqdm=True)
        Trainer(model=b_model, args=args, train_dataset=dataset(), optimizers=(b_opt, sched),
                callbacks=[_AtTrainBegin(b_starts)]).train()
        b_opt.close()

        assert set(at_b_start["steps"].values()) == {30}
        assert_same(at_b_start["values"], a_final, what="shards when B's Trainer starts vs A's step 30")
        assert set(shard_steps([address]).values()) == {32}  # B's two steps applied on top of A's 30
        assert_same(shard_values([address]), params_of(b_model), what="shards vs B's model after its steps")
