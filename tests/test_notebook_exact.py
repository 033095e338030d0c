"""Notebook-exact mode: the project's own commands reproduce the stored outputs of the lecture's notebook,
makemore_part3_bn.ipynb (kept beside the checkout in ../shared/refs/), read from the notebook file itself.

configs/lecture/notebook_deep.yaml through `fit` (with the diagnostics), reproduce's evaluation and `sample`:
cell 14 (loss at step 0), cells 15-17 (the tables at step 1000), cell 19 (train/val loss), cell 20 (names).
configs/lecture/notebook_batchnorm.yaml through `reproduce` (200000 steps, marked reference): cells 7 and 10.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from mm_lightning.data import NamesDataModule, NotebookSampler
from mm_lightning.model import MLP, LectureBatchNorm1d, LectureFirstBatchNorm1d, MLPConfig
from tests.conftest import ROOT, flat_tag, run_cli, scalars

# beside the checkout in CI (../shared/refs/), or wherever $MM_LIGHTNING_LECTURE_NOTEBOOK says
NOTEBOOK = Path(os.environ.get("MM_LIGHTNING_LECTURE_NOTEBOOK") or ROOT.parent / "shared/refs/makemore_part3_bn.ipynb")
DEEP = ROOT / "configs" / "lecture" / "notebook_deep.yaml"
SEED = 2147483647  # g = torch.Generator().manual_seed(2147483647)


def stored_output(marker: str) -> list[str]:
    """The printed lines of the notebook's code cell whose source contains `marker`."""
    if not NOTEBOOK.is_file():
        pytest.skip(f"the lecture's notebook is not at {NOTEBOOK}; set MM_LIGHTNING_LECTURE_NOTEBOOK")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    cell = next(c for c in cells if c["cell_type"] == "code" and marker in "".join(c["source"]))
    text = "".join("".join(o.get("text", "")) for o in cell["outputs"] if o.get("output_type") == "stream")
    return text.splitlines()


# ------------------------------------------------------------------------------ the pieces, against the notebook


def notebook_init(dims: list[int], vocab_size: int = 27, n_embd: int = 10):
    """Cell 13's draws, written out as the notebook writes them: C, then each Linear's (fan_in, fan_out) weight."""
    g = torch.Generator().manual_seed(SEED)
    C = torch.randn((vocab_size, n_embd), generator=g)
    weights = [torch.randn((a, b), generator=g) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
    return g, C, weights


def test_init_draws_the_notebooks_tensors_and_hands_its_generator_on(names_file):
    net = MLP(MLPConfig(gain=1.0, bn_style="lecture", init_seed=SEED))
    g, C, weights = notebook_init([30, 100, 100, 100, 100, 100, 27])
    assert torch.equal(net.embedding.weight, C)
    linears = [m for m in net.layers if isinstance(m, torch.nn.Linear)]
    for linear, w in zip(linears, weights, strict=True):
        assert torch.equal(linear.weight, w.T)  # nn.Linear holds (fan_out, fan_in): x @ W == F.linear(x, W.T)
    assert torch.equal(net.layers[-1].weight, torch.ones(27) * 0.1)  # layers[-1].gamma *= 0.1
    # the minibatches continue the same generator: the first is the notebook's first torch.randint
    data = NamesDataModule(path=str(names_file), sampler="notebook")
    data.setup()
    data.follow_init_generator(net.init_generator_state)
    x, y = next(iter(data.train_dataloader()))
    ix = torch.randint(0, 182625, (32,), generator=g)
    Xtr, Ytr = data.splits["train"]
    assert torch.equal(x, Xtr[ix]) and torch.equal(y, Ytr[ix])


def test_the_first_batchnorm_runs_init_draws_the_output_bias_too():
    # cell 6: W1 = randn * (5/3)/30**0.5, W2 = randn * 0.01, b2 = randn * 0: three draws from g, b2's included
    config = MLPConfig(
        n_hidden=200, n_layers=1, output_batchnorm=False, gain=5 / 3, output_init="normal", output_scale=0.01,
        bn_style="lecture_first", bn_momentum=0.001, init_seed=SEED,
    )  # fmt: skip
    net = MLP(config)
    g = torch.Generator().manual_seed(SEED)
    C = torch.randn((27, 10), generator=g)
    W1 = torch.randn((30, 200), generator=g) * (5 / 3) / ((10 * 3) ** 0.5)
    W2 = torch.randn((200, 27), generator=g) * 0.01
    b2 = torch.randn(27, generator=g) * 0
    assert torch.equal(net.embedding.weight, C)
    assert torch.equal(net.layers[0].weight, W1.T) and torch.equal(net.layers[3].weight, W2.T)
    assert torch.equal(net.layers[3].bias, b2)
    assert torch.equal(net.init_generator_state, g.get_state())


def test_lecture_batchnorm_is_the_notebooks_class_op_for_op():
    torch.manual_seed(0)
    bn = LectureBatchNorm1d(5, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    x = torch.randn(32, 5) * 3 + 1
    xmean, xvar = x.mean(0, keepdim=True), x.var(0, keepdim=True)  # cell 13's BatchNorm1d.__call__
    assert torch.equal(bn(x), bn.weight * ((x - xmean) / torch.sqrt(xvar + 1e-5)) + bn.bias)
    assert torch.equal(bn.running_mean, (0.9 * torch.zeros(5) + 0.1 * xmean).squeeze(0))
    assert torch.equal(bn.running_var, (0.9 * torch.ones(5) + 0.1 * xvar).squeeze(0))
    assert not torch.allclose(bn(x), torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
    bn.eval()
    expected = bn.weight * ((x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5)) + bn.bias
    assert torch.equal(bn(x), expected)


def test_the_first_batchnorm_is_cell_7s_inline_code_op_for_op():
    torch.manual_seed(0)
    bn = LectureFirstBatchNorm1d(5, momentum=0.001)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    bngain, bnbias = bn.weight.detach().clone()[None], bn.bias.detach().clone()[None]
    bnmean_running, bnstd_running = torch.zeros((1, 5)), torch.ones((1, 5))
    for _ in range(3):  # cell 7's training-time lines, three minibatches
        hpreact = torch.randn(32, 5) * 3 + 1
        bnmeani, bnstdi = hpreact.mean(0, keepdim=True), hpreact.std(0, keepdim=True)
        assert torch.equal(bn(hpreact), bngain * (hpreact - bnmeani) / bnstdi + bnbias)
        bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
        bnstd_running = 0.999 * bnstd_running + 0.001 * bnstdi
    assert torch.equal(bn.running_mean, bnmean_running[0]) and torch.equal(bn.running_std, bnstd_running[0])
    assert torch.equal(bn.running_var, bn.running_std.square())  # what fold-batchnorm reads
    bn.eval()  # cell 10's split_loss
    assert torch.equal(bn(hpreact), bngain * (hpreact - bnmean_running) / bnstd_running + bnbias)


def test_notebook_sampler_resumes_anywhere_on_the_same_stream():
    state = torch.Generator().manual_seed(SEED).get_state()
    whole = NotebookSampler(1000, 32, state).indices(0, 250)
    g = torch.Generator().manual_seed(SEED)
    assert torch.equal(whole, torch.stack([torch.randint(0, 1000, (32,), generator=g) for _ in range(250)]))
    resumed = NotebookSampler(1000, 32, state)
    assert torch.equal(resumed.indices(130, 200), whole[130:200])  # a fresh process resuming at step 130
    assert torch.equal(resumed.indices(200, 250), whole[200:])  # and going on
    assert torch.equal(resumed.indices(10, 20), whole[10:20])  # going back replays from the start


def test_notebook_sampler_is_one_stream_for_one_process(names_file):
    from types import SimpleNamespace

    from mm_lightning.errors import UsageError

    data = NamesDataModule(path=str(names_file), sampler="notebook")
    data.setup()
    data.follow_init_generator(torch.Generator().manual_seed(SEED).get_state())
    data.trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=1, global_step=0, max_steps=9)
    with pytest.raises(UsageError, match="use sampler steps with DDP"):
        data.train_dataloader()


def test_what_the_notebook_options_cannot_honour_is_refused_in_one_line(project):
    def refused(*args: str) -> str:
        proc = run_cli(["fit", *args, "--trainer.max_steps", "1"], project, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert not list(project.glob("lightning_logs/version_*"))  # refused before a run directory is claimed
        return proc.stderr

    assert "set --model.net.init_seed" in refused("--data.sampler", "notebook")
    assert "use kaiming or normal" in refused("--model.net.init_seed", "1", "--model.net.init", "torch")
    # two processes: refused before DDP starts them
    two = ("--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert "use sampler steps with DDP" in refused("--config", str(DEEP), *two)
    no_bn = ("--model.net.batchnorm", "false", "--model.net.output_batchnorm", "false")
    assert "has no effect without batchnorm" in refused("--model.net.bn_style", "lecture", *no_bn)
    # SyncBatchNorm would silently replace the lecture's BatchNorm with torch's
    assert "use bn_style torch with it" in refused(
        "--model.net.bn_style", "lecture", "--trainer.sync_batchnorm", "true"
    )


# -------------------------------------------------------------------- the deep network, through the real commands


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory, names_file) -> Path:
    """`fit --config configs/lecture/notebook_deep.yaml` as a user runs it; its run directory."""
    root = tmp_path_factory.mktemp("notebook_deep")
    run_cli(["fit", "--config", str(DEEP), "--data.path", str(names_file), "--trainer.default_root_dir", "."], root)
    return root / "lightning_logs" / "version_0"


def test_cell_14_and_15_step_0_loss_and_activation_table(deep_run):
    logged = scalars(deep_run)
    at = lambda tag: dict(logged[tag])[1000]  # noqa: E731 - the notebook's tables are of step i = 1000
    assert f"{0:7d}/{200000:7d}: {dict(logged['sampled/loss'])[0]:.4f}" == stored_output("ud.append")[0]
    printed = stored_output("saturated: %.2f%%")
    for line, layer in zip(printed, (2, 5, 8, 11, 14), strict=True):
        name = f"net.layers.{layer}"
        mean, std = at(flat_tag(f"act/mean/{name}")), at(flat_tag(f"act/std/{name}"))
        ours = f"mean {mean:+.2f}, std {std:.2f}, saturated: {at(flat_tag(f'act/saturation/{name}')):.2f}%"
        assert line.endswith(ours), (line, ours)


def test_cell_16_output_gradient_table(deep_run):
    logged = scalars(deep_run)
    at = lambda tag: dict(logged[tag])[1000]  # noqa: E731
    for line, layer in zip(stored_output("t = layer.out.grad"), (2, 5, 8, 11, 14), strict=True):
        name = f"net.layers.{layer}"
        # the means are round-off around 0 (~1e-11: BatchNorm's gradient sums to zero), so their printed sign is
        # the sign of round-off: the notebook's own code run on this machine prints other signs. Digits only.
        mean, std = at(flat_tag(f"grad/mean/{name}")), at(flat_tag(f"grad/std/{name}"))
        ours = f"mean {abs(mean):f}, std {std:e}"
        assert line.replace("mean -", "mean ").replace("mean +", "mean ").endswith(ours), (line, ours)


def test_cell_17_weight_gradient_table(deep_run):
    """The mean to its 6 decimals; the std to 1e-6 (its 7th digit, the spread of float32 reductions: the notebook's
    own code run here prints 9.241071e-03 for its 9.241077e-03); grad:data as the notebook computes it, against
    the weights after step 1000's update (last.ckpt): to 1e-6 too. The diagnostics' own grad:data divides by the
    weights the gradient was computed for (before the update): within 1e-4 of it."""
    logged = scalars(deep_run)
    at = lambda tag: dict(logged[tag])[1000]  # noqa: E731
    weights = torch.load(deep_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    names = ["net.embedding.weight"] + [f"net.layers.{i}.weight" for i in (0, 3, 6, 9, 12, 15)]
    pattern = r"weight +\((\d+), (\d+)\) \| mean ([+-][\d.]+) \| std ([\d.e+-]+) \| grad:data ratio ([\d.e+-]+)"
    for line, name in zip(stored_output("grad:data ratio"), names, strict=True):
        rows, cols, mean, std, ratio = re.fullmatch(pattern, line.strip()).groups()
        p = weights[name] if name == "net.embedding.weight" else weights[name].T  # the notebook's (fan_in, fan_out)
        assert tuple(p.shape) == (int(rows), int(cols))
        grad_mean = at(flat_tag(f"weight/grad_mean/{name}"))
        assert f"{grad_mean:+f}" == mean or (float(mean) == 0 and abs(grad_mean) < 5e-7)  # (a round-off zero's sign)
        grad_std = at(flat_tag(f"weight/grad_std/{name}"))
        assert grad_std == pytest.approx(float(std), rel=1e-6)
        assert grad_std / p.std().item() == pytest.approx(float(ratio), rel=1e-6)
        # step 1000's update moves std(weights) by up to 7e-5 (relative) here: the diagnostics' ratio is that close
        assert at(flat_tag(f"weight/grad_data_ratio/{name}")) == pytest.approx(float(ratio), rel=1e-4)


def test_cell_19_split_losses_to_the_last_digit(deep_run, names_file):
    from mm_lightning.reproduce import evaluate

    step, losses = evaluate(deep_run / "checkpoints" / "last.ckpt", str(names_file))
    assert step == 1001
    assert [f"train {losses['train']}", f"val {losses['val']}"] == stored_output("layer.training = False")


def test_cell_20_names_sampled_one_at_a_time(deep_run):
    ckpt = deep_run / "checkpoints" / "last.ckpt"
    proc = run_cli(["sample", "--ckpt_path", str(ckpt), "--one_at_a_time", "--seed", str(SEED + 10)], deep_run)
    assert proc.stdout.split() == [name.removesuffix(".") for name in stored_output("sample from the model")]
    parallel = run_cli(["sample", "--ckpt_path", str(ckpt), "--seed", str(SEED + 10)], deep_run).stdout.split()
    assert parallel != proc.stdout.split()  # all at once draws in another order: only one at a time is the notebook's


def test_validate_a_notebook_run_from_another_directory(deep_run, tmp_path, names_file):
    """The run's own config.yaml is the base for evaluating it, wherever the command runs."""
    ckpt = deep_run / "checkpoints" / "last.ckpt"
    proc = run_cli(["validate", "--ckpt_path", str(ckpt), "--data.path", str(names_file)], tmp_path)
    assert "2.3982" in proc.stdout, proc.stdout[-2000:]


def test_a_folded_notebook_checkpoint_samples_the_notebooks_names(deep_run, tmp_path):
    folded, trained = tmp_path / "folded.ckpt", deep_run / "checkpoints" / "last.ckpt"
    run_cli(["fold-batchnorm", "--ckpt_path", str(trained), "--out", str(folded)], tmp_path)
    proc = run_cli(["sample", "--ckpt_path", str(folded), "--one_at_a_time", "--seed", str(SEED + 10)], tmp_path)
    assert proc.stdout.split() == [name.removesuffix(".") for name in stored_output("sample from the model")]


def test_the_notebooks_batchnorm_folds_like_torchs(deep_run, names_file):
    from mm_lightning.fold import fold_batchnorm
    from mm_lightning.runs import checkpoint_net, load_checkpoint

    net = checkpoint_net(load_checkpoint(deep_run / "checkpoints" / "last.ckpt")).eval()
    assert isinstance(net.layers[1], LectureBatchNorm1d)
    data = NamesDataModule(path=str(names_file))
    data.setup()
    x, _ = data.splits["val"]
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(net)(x), net(x), atol=1e-5, rtol=0)
        first = MLP(MLPConfig(n_hidden=200, n_layers=1, output_batchnorm=False, bn_style="lecture_first"))
        for i in range(0, 3200, 32):  # move its running mean and std away from 0 and 1
            first(x[i : i + 32])
        first.eval()
        assert isinstance(first.layers[1], LectureFirstBatchNorm1d)
        assert torch.allclose(fold_batchnorm(first)(x), first(x), atol=1e-5, rtol=0)


def test_a_resumed_notebook_run_draws_the_same_minibatches(tmp_path, names_file, deep_run):
    """Stopped at step 600 and resumed: the notebook's stream is replayed up to there, so the end is the same."""
    common = ["--config", str(DEEP), "--data.path", str(names_file), "--trainer.default_root_dir", "."]
    run_cli(["fit", *common, "--trainer.max_steps", "600", "--data.steps_per_epoch", "300"], tmp_path)
    run_cli(["fit", *common, "--data.steps_per_epoch", "300", "--ckpt_path", "last"], tmp_path)
    resumed = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    whole = torch.load(deep_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 1001
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


# ------------------------------------------------------------------- the first BatchNorm run, 200000 steps


@pytest.mark.slow
@pytest.mark.reference
def test_cells_7_and_10_the_single_layer_run(tmp_path, names_file):
    """Cell 10's split losses within 0.002 after the notebook's 200000 steps, and cell 7's curve beside the
    notebook's (about 7 minutes on 2 CPU cores; run with `pytest -m reference`)."""
    from mm_lightning.reproduce import main

    config = ROOT / "configs" / "lecture" / "notebook_batchnorm.yaml"
    assert main([str(config), "--out", str(tmp_path), "--data_path", str(names_file), "--jobs", "1"]) == 0
    train, val = (float(line.split()[1]) for line in stored_output("(hpreact - bnmean_running)"))
    row = (tmp_path / "results.csv").read_text().splitlines()[1].split(",")
    assert abs(float(row[3]) - train) < 0.002 and abs(float(row[4]) - val) < 0.002, row
    curve = (tmp_path / "notebook_batchnorm_curve.md").read_text().splitlines()[2:]
    printed = [float(line.split(":")[-1]) for line in stored_output("bnmean_running = 0.999")]
    assert [float(r.split("|")[2]) for r in curve] == printed
    ours = [float(r.split("|")[3]) for r in curve]
    assert ours[0] == printed[0]  # step 0: the same init and minibatch, so the same loss
    # the same trajectory: each point to its 4 printed decimals, up to the last digit of a value on a rounding edge
    assert all(abs(a - b) <= 1.5e-4 for a, b in zip(ours, printed, strict=True)), ours


def test_the_api_names_a_missing_config_in_one_line(tmp_path, monkeypatch):
    from mm_lightning.errors import UsageError
    from mm_lightning.lecture import diagnose

    monkeypatch.chdir(tmp_path)  # e.g. Jupyter started in notebooks/, a path relative to the project's root
    with pytest.raises(UsageError, match=f"configs/lecture/notebook_deep.yaml: no such file in {tmp_path}"):
        diagnose("configs/lecture/notebook_deep.yaml", steps=1000)
