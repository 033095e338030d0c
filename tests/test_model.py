"""The MLP: shapes, parameter count, init schemes and the loss at init."""

import math

import pytest
import torch
import torch.nn.functional as F

from mm_lightning.data import NamesDataModule
from mm_lightning.errors import UsageError
from mm_lightning.model import MLP, MLPConfig, generate


@pytest.fixture(scope="module")
def train_split(names_file):
    dm = NamesDataModule(path=str(names_file))
    dm.setup()
    return dm.splits["train"].tensors()


def test_shapes_and_the_lectures_parameter_count():
    net = MLP(MLPConfig())
    assert net(torch.zeros(7, 3, dtype=torch.long)).shape == (7, 27)
    assert sum(p.numel() for p in net.parameters()) == 47024  # the lecture's deep BN network, bias-free Linears
    names = [type(m).__name__ for m in net.layers]
    assert names == ["Linear", "BatchNorm1d", "Tanh"] * 5 + ["Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in net.layers if isinstance(m, torch.nn.Linear))


def test_default_loss_at_init_is_near_ln_27(train_split):
    x, y = train_split
    torch.manual_seed(0)
    net = MLP(MLPConfig())
    idx = torch.randint(0, len(y), (4096,))
    loss = F.cross_entropy(net(x[idx]), y[idx]).item()
    assert abs(loss - math.log(27)) < 0.1, loss


def test_init_schemes():
    torch.manual_seed(0)
    kaiming = MLP(MLPConfig(n_hidden=400, gain=5 / 3))
    w = kaiming.layers[3].weight  # second hidden Linear, fan_in 400
    assert abs(w.std().item() - (5 / 3) / math.sqrt(400)) < 0.01
    assert torch.allclose(kaiming.layers[-1].weight, torch.full((27,), 0.1))  # output gamma x 0.1
    normal = MLP(MLPConfig(init="normal", gain=0.2, batchnorm=False, bias_scale=0.01, n_hidden=400))
    assert abs(normal.layers[2].weight.std().item() - 0.2) < 0.01
    assert 0 < normal.layers[0].bias.abs().max().item() < 0.05
    no_bn = MLP(MLPConfig(batchnorm=False, output_batchnorm=False, output_scale=0.1))
    ref = MLP(MLPConfig(batchnorm=False, output_batchnorm=False, output_scale=1.0))
    assert no_bn.layers[-1].weight.std().item() == pytest.approx(0.1 * ref.layers[-1].weight.std().item(), rel=0.2)
    assert torch.count_nonzero(no_bn.layers[-1].bias) == 0
    torch_default = MLP(MLPConfig(init="torch", gain=1.0, batchnorm=False, n_hidden=64))
    bound = 1 / math.sqrt(64)
    assert torch_default.layers[2].weight.abs().max().item() <= bound
    first = MLP(
        MLPConfig(
            n_layers=1, init="kaiming", output_init="normal", output_scale=0.01, batchnorm=False, output_batchnorm=False
        )
    )
    assert first.layers[-1].weight.std().item() == pytest.approx(0.01, rel=0.2)  # W2 = randn * 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "block_size must be at least 1"),
        ({"n_layers": -1}, "n_layers must be 0 or more"),
        ({"init": "xavier"}, "init must be one of torch, kaiming, normal"),
        ({"gain": 0.0}, "gain must be positive"),
        ({"vocab": "abc"}, "vocab must be '.' followed"),
        ({"init": "torch", "bias_scale": 0.5}, "no effect with init 'torch'"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(kwargs, message):
    with pytest.raises(UsageError, match=message):
        MLPConfig(**kwargs)


def test_generate_is_seeded_and_ends_at_the_boundary():
    torch.manual_seed(0)
    net = MLP(MLPConfig())
    a = generate(net, 10, generator=torch.Generator().manual_seed(3))
    b = generate(net, 10, generator=torch.Generator().manual_seed(3))
    assert a == b and len(a) == 10 and all("." not in w for w in a)
    with pytest.raises(UsageError, match="temperature must be positive"):
        generate(net, 3, temperature=0)
    with pytest.raises(UsageError, match="at least 1"):
        generate(net, 0)


def test_the_default_optimizer_updates_every_parameter_in_one_call_with_sgds_numbers():
    """The module's SGD runs foreach (one call for all parameters, ~9 us a step less than a loop over them on a CPU)
    and its step is bit for bit p.add_(grad, alpha=-lr) per parameter, the single-tensor SGD's arithmetic."""
    from mm_lightning.module import MakemoreModule

    module = MakemoreModule(net=MLPConfig(vocab="." + "abcdefghijklmnopqrstuvwxyz"))
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["foreach"] is True
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in module.parameters()]
    expected = [p.detach().clone().add_(g, alpha=-0.1) for p, g in zip(module.parameters(), grads)]
    for p, g in zip(module.parameters(), grads):
        p.grad = g
    optimizer.step()
    assert all(torch.equal(p.detach(), e) for p, e in zip(module.parameters(), expected))


def test_lightnings_load_from_checkpoint_gives_back_the_trained_module(tmp_path, names_file):
    """`MakemoreModule.load_from_checkpoint(path)`, Lightning's own way to load a model in Python: the saved
    hparams (plain values: the config as a dict) build the same network, with the trained weights, weights_only."""
    import lightning as L

    from mm_lightning.module import MakemoreModule

    config = MLPConfig(n_hidden=16, n_layers=2, output_scale=0.5)
    trained = MakemoreModule(net=config, lr=0.05, milestones=[7])
    trainer = L.Trainer(
        max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(trained, NamesDataModule(path=str(names_file), batch_size=8, steps_per_epoch=12))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MakemoreModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.net.config == config and loaded.hparams.lr == 0.05 and list(loaded.hparams.milestones) == [7]
    state, again = trained.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert loaded.sample(3, seed=1) == trained.sample(3, seed=1)
