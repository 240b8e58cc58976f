"""Lightning driving RemoteAdam: `configure_optimizers` returns RemoteAdam and a step-interval
scheduler; gradient_clip_val, accumulate_grad_batches; checkpoints and fit(ckpt_path=...) onto fresh
and onto still-running shards.

With torch's Adam math (eps=1e-8, optimized_update=False, weight_decouple=False: coupled L2 decay)
RemoteAdam must give bitwise the weights torch.optim.Adam(fused=True) gives under the same run (the
shards run torch's fused kernel; torch's for-loop Adam differs from its own fused one by ulps).

Lightning's order on fit(ckpt_path=...) (lightning 2.6.6), which decides what `init` must be:
1. the checkpoint's weights go into the module in place (trainer/trainer.py:1046
   _restore_modules_and_callbacks -> strategies/strategy.py:372 module.load_state_dict);
2. then configure_optimizers runs (trainer.py:1053 strategy.setup -> strategy.py:159 setup_optimizers),
   so RemoteAdam is built on a model that already holds the checkpoint's weights, and
   fabric's _optimizers_to_device walks opt.state (strategy.py:162);
3. then the optimizer state is loaded (trainer.py:1070 restore_training_state ->
   strategy.py:377 opt.load_state_dict, then _optimizer_to_device walks opt.state again), and the
   schedulers' (checkpoint_connector.py:404).
So on fresh shards the default init="shard" registers the checkpoint's weights; on shards still
running (ahead of the checkpoint) init="model" is needed: with "shard" the module would adopt the
shards' newer values over the restored ones and the older optimizer state would be refused.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from integration_helpers import assert_same, params_of, shard_steps, shard_values

from optserve import RemoteAdam
from optserve.server.main import run_server

pytestmark = pytest.mark.filterwarnings(
    "ignore:The dirpath has changed:UserWarning",  # a resumed run writes its checkpoints elsewhere, on purpose
    "ignore:.*LeafSpec.*is deprecated")  # lightning 2.6.6 on torch 2.13, inside lightning

LR, WEIGHT_DECAY = 1e-2, 1e-2
EPOCHS, STEPS_PER_EPOCH = 4, 4  # 8 batches of 8 per epoch, accumulate_grad_batches=2


class Net(L.LightningModule):
    def __init__(self, make_optimizer, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
        self.make_optimizer = make_optimizer
        self.optimizers_made = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = self.make_optimizer(self)
        self.optimizers_made.append(opt)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False, num_workers=0)


def torch_adam(module):
    return torch.optim.Adam(module.parameters(), lr=LR, eps=1e-8, weight_decay=WEIGHT_DECAY, fused=True)


def remote_adam(servers, **options):
    def make(module):
        return RemoteAdam(module.named_parameters(), servers, lr=LR, eps=1e-8, weight_decay=WEIGHT_DECAY,
                          weight_decouple=False, optimized_update=False, **options)
    return make


def fit(out_dir, make_optimizer, *, ckpt_path=None, seed=0) -> Net:
    """Four epochs; a checkpoint at the end of each (epoch=0.ckpt ... epoch=3.ckpt). A resumed run
    starts from a module of another seed, so it ends right only if the checkpoint's weights count."""
    module = Net(make_optimizer, seed=seed)
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=0.5, accumulate_grad_batches=2,
                        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=str(out_dir),
                        callbacks=[ModelCheckpoint(dirpath=str(out_dir), filename="{epoch}", every_n_epochs=1,
                                                   save_top_k=-1)])
    try:
        trainer.fit(module, loader(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    finally:
        for opt in module.optimizers_made:
            if isinstance(opt, RemoteAdam):
                opt.close()
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    return module


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """torch.optim.Adam(fused=True) for 16 steps, and the same run resumed from epoch 2 (step 8): the
    resumed run equals the uninterrupted one bitwise, so whatever differs below comes from RemoteAdam."""
    out = tmp_path_factory.mktemp("torch")
    full = params_of(fit(out / "full", torch_adam))
    resumed = params_of(fit(out / "resumed", torch_adam, ckpt_path=out / "full" / "epoch=1.ckpt", seed=1))
    assert_same(resumed, full, what="torch Adam resumed vs uninterrupted")
    return full


@pytest.fixture
def remote_full_run(tmp_path):
    """RemoteAdam for 16 steps on one in-process shard; the shard stays up."""
    with run_server() as address:
        weights = params_of(fit(tmp_path / "full", remote_adam([address])))
        yield address, weights, tmp_path / "full" / "epoch=1.ckpt"


def test_lightning_clip_and_accumulation_match_torch_adam(remote_full_run, torch_reference):
    address, weights, _ = remote_full_run

    assert_same(weights, torch_reference, what="RemoteAdam vs torch Adam(fused=True)")
    assert_same(shard_values([address]), weights, what="shard vs the module")
    assert shard_steps([address]) == {k: EPOCHS * STEPS_PER_EPOCH for k in weights}


def test_resume_onto_fresh_shards(remote_full_run, tmp_path):
    _, weights, checkpoint = remote_full_run
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]  # plain data only
    assert {int(s["step"]) for s in saved["state"].values()} == {2 * STEPS_PER_EPOCH}

    with run_server() as fresh:
        module = fit(tmp_path / "resumed", remote_adam([fresh]), ckpt_path=checkpoint, seed=1)
        assert_same(params_of(module), weights, what="resumed on fresh shards vs uninterrupted")
        assert shard_steps([fresh]) == {k: EPOCHS * STEPS_PER_EPOCH for k in weights}


def test_resume_onto_the_running_shards_with_init_model(remote_full_run, tmp_path):
    address, weights, checkpoint = remote_full_run

    module = fit(tmp_path / "resumed", remote_adam([address], init="model"), ckpt_path=checkpoint, seed=1)

    assert_same(params_of(module), weights, what="resumed on the running shards vs uninterrupted")
    assert_same(shard_values([address]), weights, what="shard after the resumed run")
    assert shard_steps([address]) == {k: EPOCHS * STEPS_PER_EPOCH for k in weights}


def test_resume_onto_the_running_shards_without_init_model_is_refused(remote_full_run, tmp_path):
    address, weights, checkpoint = remote_full_run

    with pytest.raises((ValueError, RuntimeError), match=r"init=.model"):
        fit(tmp_path / "resumed", remote_adam([address]), ckpt_path=checkpoint, seed=1)

    assert_same(shard_values([address]), weights, what="shard after the refused resume")
    assert shard_steps([address]) == {k: EPOCHS * STEPS_PER_EPOCH for k in weights}
