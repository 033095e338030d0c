"""Notebook-exact mode: the project's own commands against the lecture's notebook, makemore_part3_bn.ipynb (kept
beside the checkout in ../shared/refs/), read from the notebook file itself, in two ways:

- bit for bit against the notebook's own code, run here: its cells are read from the file, patched only where a
  test must (the step count, a learning-rate milestone, cell 13's commented-out layer list) and executed in this
  process on this machine, one CPU thread, as the CLI's fit runs. Same machine, same kernels: nothing here depends
  on which CPU runs it.
- against the outputs the notebook file stores (printed on the lecture author's machine): to the printed digit up to
  a float32-rounding tolerance derived below (reduction_rtol), since the last digit of a float32 reduction depends on
  the CPU's kernels (the notebook's own code prints 2.640701e-03 here for its stored 2.640702e-03).

configs/lecture/notebook_deep.yaml through `fit` (with the diagnostics), reproduce's evaluation and `sample`:
cell 14 (loss at step 0), cells 15-17 (the tables at step 1000), cell 19 (train/val loss), cell 20 (names).
configs/lecture/notebook_deep_nobn.yaml: cell 13's layer list without BatchNorm (init, and a short run).
configs/lecture/notebook_batchnorm.yaml: cells 6-7 (init, a short run), and through `reproduce` (200000 steps,
marked reference): cells 7 and 10.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from mm_lightning.data import NamesDataModule
from mm_lightning.lecture import LectureBatchNorm1d, LectureFirstBatchNorm1d, NotebookNamesDataModule, NotebookSampler
from mm_lightning.lecture import NotebookMLP as MLP
from mm_lightning.lecture import NotebookMLPConfig as MLPConfig
from mm_lightning.module import MakemoreModule
from tests.conftest import ROOT, flat_tag, run_cli, scalars

# beside the checkout in CI (../shared/refs/), or wherever $MM_LIGHTNING_LECTURE_NOTEBOOK says
NOTEBOOK = Path(os.environ.get("MM_LIGHTNING_LECTURE_NOTEBOOK") or ROOT.parent / "shared/refs/makemore_part3_bn.ipynb")
LECTURE = ROOT / "configs" / "lecture"
DEEP, DEEP_NOBN, FIRST_BN = (LECTURE / f"notebook_{n}.yaml" for n in ("deep", "deep_nobn", "batchnorm"))
SEED = 2147483647  # g = torch.Generator().manual_seed(2147483647)


def notebook_cells() -> list[dict]:
    if not NOTEBOOK.is_file():
        pytest.skip(f"the lecture's notebook is not at {NOTEBOOK}; set MM_LIGHTNING_LECTURE_NOTEBOOK")
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]


def notebook_cell(marker: str) -> dict:
    """The notebook's code cell whose source contains `marker` (exactly one does)."""
    found = [c for c in notebook_cells() if marker in "".join(c["source"])]
    assert len(found) == 1, f"{len(found)} code cells of the notebook contain {marker!r}"
    return found[0]


def stored_output(marker: str) -> list[str]:
    """The printed lines of the notebook's code cell whose source contains `marker`."""
    cell = notebook_cell(marker)
    text = "".join("".join(o.get("text", "")) for o in cell["outputs"] if o.get("output_type") == "stream")
    return text.splitlines()


def notebook_code(marker: str, *edits: tuple[str, str]) -> str:
    """The source of that cell, without IPython's %magic lines, with each (old, new) edit made; an edit whose old
    text is not there exactly once fails, so a changed notebook is noticed rather than run half-patched."""
    source = "".join(notebook_cell(marker)["source"])
    source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%"))
    for old, new in edits:
        assert source.count(old) == 1, f"{old!r} is not in the notebook's cell once"
        source = source.replace(old, new)
    return source


def without_batchnorm(cell_13: str) -> str:
    """Cell 13 with the layer list it keeps commented out (Linear with its zero bias, Tanh; no BatchNorm) in place
    of the BatchNorm one, `layers[-1].weight *= 0.1` (also commented there) in place of the gamma line, and the gain
    its comment names, 5/3: configs/lecture/notebook_deep_nobn.yaml."""
    with_bn = re.search(r"^layers = \[\n.*?^\]\n", cell_13, re.M | re.S).group(0)
    commented = re.search(r"^# layers = \[\n.*?^# \]\n", cell_13, re.M | re.S).group(0)
    plain = "".join(line[2:] + "\n" for line in commented.splitlines())
    edits = [(with_bn, plain), ("layers[-1].gamma *= 0.1\n  #layers[-1].weight", "layers[-1].weight")]
    edits.append(("layer.weight *= 1.0 #5/3", "layer.weight *= 5/3"))
    for old, new in edits:
        assert cell_13.count(old) == 1, old
        cell_13 = cell_13.replace(old, new)
    return cell_13


@contextlib.contextmanager
def one_thread():
    """The CLI's fit runs this model on one CPU thread (fastpath.py); the notebook's code runs so here too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def notebook_data(tmp_path_factory, names_file) -> dict:
    """The namespace after the notebook's cells 1-5 (imports, names.txt, vocabulary, the three splits), run as they
    are in a directory whose names.txt is ours."""
    here = tmp_path_factory.mktemp("notebook")
    (here / "names.txt").symlink_to(Path(names_file).resolve())
    # (cell 3, len(words), only shows a number)
    markers = ("import torch.nn.functional as F", "words = open(", "stoi['.'] = 0", "def build_dataset")
    cwd = Path.cwd()
    os.chdir(here)
    try:
        return run_notebook({}, *(notebook_code(m) for m in markers))
    finally:
        os.chdir(cwd)


def run_notebook(namespace: dict, *sources: str) -> dict:
    """Execute notebook code on a copy of a namespace; what it printed is the result's "printed" (a list of lines)."""
    namespace, out = dict(namespace), io.StringIO()
    with one_thread(), contextlib.redirect_stdout(out):
        for source in sources:
            exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    namespace["printed"] = out.getvalue().splitlines()
    return namespace


def net_config(path: Path) -> MLPConfig:
    return MLPConfig(**yaml.safe_load(path.read_text())["model"]["net"]["init_args"])


def as_notebook_parameters(net_state: dict[str, torch.Tensor], net: MLP) -> list[torch.Tensor]:
    """A deep network's state_dict as cell 13's `parameters` list: C, then each layer's (Linear: weight as
    (fan_in, fan_out), bias; BatchNorm1d: gamma, beta)."""
    out = [net_state["embedding.weight"]]
    for i, layer in enumerate(net.layers):
        if isinstance(layer, torch.nn.Linear):  # nn.Linear holds (fan_out, fan_in): x @ W == F.linear(x, W.T)
            out.append(net_state[f"layers.{i}.weight"].T)
            out += [net_state[f"layers.{i}.bias"]] if layer.bias is not None else []
        elif isinstance(layer, torch.nn.BatchNorm1d):
            out += [net_state[f"layers.{i}.weight"], net_state[f"layers.{i}.bias"]]
    return out


def assert_bitwise(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        b = b.detach().reshape(a.shape)  # (the notebook's BatchNorm buffers are (1, dim))
        assert torch.equal(a, b), f"parameter {i}: {(a != b).sum().item()} of {a.numel()} values differ"


# --------------------------------------------------------------- tolerances for the notebook's stored outputs

U = 2.0**-24  # float32's unit roundoff


def reduction_rtol(n_terms: int, reductions: int = 1) -> float:
    """How far two CPUs may print the same float32 statistic of the same n float32 numbers apart, relative to it.

    A mean, a variance or a loss is a float32 sum; the order of its additions is the kernel's choice (SIMD width,
    blocking, threads), and that is what differs between CPUs. Blocked (pairwise) summation of same-sign terms is
    within ceil(log2 n) * u of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 4.2),
    so two orders are within twice that; 4 more u cover the elementwise ops around the sum (the mean's subtraction,
    square, sqrt, log-sum-exp, the final division). A ratio of two statistics adds both (reductions=2). For the
    notebook's 32 x 100 activations: 2 * (12 + 4) * u = 1.9e-6; the differences seen on two x86 CPUs were up to
    1.13e-6 (cell 17's grad:data) and one float32 step of a loss (1.2e-7)."""
    return reductions * 2 * (math.ceil(math.log2(n_terms)) + 4) * U


def printed_unit(printed: str) -> float:
    """One unit of the last digit printed: 0.01 for '0.63', 1e-9 for '2.640702e-03'."""
    mantissa, _, exponent = printed.strip().lower().rstrip("%").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def assert_printed(ours: float, printed: str, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """`ours` could print as the notebook printed: within half a unit of its last digit (its own rounding), plus
    rtol of it (float32 rounding, reduction_rtol), plus atol where a statistic needs an absolute slack."""
    want = float(printed.rstrip("%"))
    slack = printed_unit(printed) / 2 + rtol * abs(want) + atol
    assert abs(ours - want) <= slack, f"{what}: ours {ours!r}, the notebook printed {printed} (slack {slack:.3g})"


# ------------------------------------------------------------------------------ the pieces, against the notebook


@pytest.mark.parametrize("config", [DEEP, DEEP_NOBN], ids=["deep", "deep_nobn"])
def test_init_draws_are_cell_13s_and_hand_its_generator_on(config, notebook_data):
    """Parameter by parameter, bit for bit: cell 13 as it stands (BatchNorm), and with its other layer list (the
    network without BatchNorm, whose Linear biases are zeros the notebook never draws)."""
    cell_13 = notebook_code("class BatchNorm1d")
    nb = run_notebook(notebook_data, cell_13 if config == DEEP else without_batchnorm(cell_13))
    net = MLP(net_config(config))
    assert len(nb["parameters"]) == len(list(net.parameters()))
    assert_bitwise(as_notebook_parameters(net.state_dict(), net), nb["parameters"])
    g = nb["g"]
    assert torch.equal(net.init_generator_state, g.get_state())  # no draw the notebook does not make
    # the minibatches continue the same generator: the first is cell 14's first torch.randint
    n = nb["Xtr"].shape[0]
    first = NotebookSampler(n, 32, net.init_generator_state).indices(0, 1)[0]
    assert torch.equal(first, torch.randint(0, n, (32,), generator=g))


def test_init_draws_are_cell_6s(notebook_data):
    """C, W1 = randn * (5/3)/30**0.5, W2 = randn * 0.01, b2 = randn * 0: four draws from g, b2's included."""
    nb = run_notebook(notebook_data, notebook_code("b2 = torch.randn"))
    net = MLP(net_config(FIRST_BN))
    state = net.state_dict()
    ours = [state["embedding.weight"], state["layers.0.weight"].T, state["layers.3.weight"].T, state["layers.3.bias"]]
    ours += [state["layers.1.weight"], state["layers.1.bias"], state["layers.1.running_mean"]]
    ours += [state["layers.1.running_std"]]
    names = ["C", "W1", "W2", "b2", "bngain", "bnbias", "bnmean_running", "bnstd_running"]
    assert_bitwise(ours, [nb[name] for name in names])
    assert torch.equal(net.init_generator_state, nb["g"].get_state())


def test_what_cell_13_never_draws_is_refused_not_drawn():
    from mm_lightning.errors import UsageError

    no_bn = dict(batchnorm=False, output_batchnorm=False, init_seed=SEED)
    with pytest.raises(UsageError, match="cell 13 draws no biases"):
        MLPConfig(**no_bn, bias_scale=0.01)
    MLPConfig(**no_bn, bias_scale=0.01, init_draws="cell6")  # cell 6 draws them (its commented-out b1)
    with pytest.raises(UsageError, match="init_draws cell6 has no effect without init_seed"):
        MLPConfig(init_draws="cell6")


def test_the_notebooks_update_is_never_silently_replaced(names_file):
    """The config's --optimizer replaces the module's own SGD, so the module's SGD options are refused beside it; a
    checkpoint trained with the notebook's update (recorded, or an earlier version's model.update lecture) is not
    resumed with another optimizer, nor one written before without model.update lecture with the notebook's."""
    from mm_lightning.cli import MakemoreCLI
    from mm_lightning.errors import UsageError
    from mm_lightning.resume import _refuse_changed_optimizer

    with pytest.raises(UsageError, match="--model.milestones configures the module's own SGD"):
        MakemoreCLI(["--config", str(DEEP), "--data.path", str(names_file), "--model.milestones", "[30]"], run=False)
    torch_sgd = MakemoreCLI(["--data.path", str(names_file)], run=False).config
    notebook = MakemoreCLI(["--config", str(DEEP), "--data.path", str(names_file)], run=False).config
    old = {"net": {"n_hidden": 100}, "lr": 0.1, "milestones": [150000], "lr_decay": 0.1}  # no "update", no record
    recorded = {"hyper_parameters": old, "optimizer_class": "mm_lightning.lecture.optim.NotebookSGD"}
    for lecture in (recorded, {"hyper_parameters": {**old, "update": "lecture"}}):
        with pytest.raises(UsageError, match="trained with the optimizer mm_lightning.lecture.optim.NotebookSGD but "
                           "this command gives torch.optim.sgd.SGD"):
            _refuse_changed_optimizer(lecture, torch_sgd, Path("old.ckpt"))
        _refuse_changed_optimizer(lecture, notebook, Path("old.ckpt"))
    with pytest.raises(UsageError, match="trained with the optimizer torch.optim.sgd.SGD"):
        _refuse_changed_optimizer({"hyper_parameters": old, "optimizer_class": "torch.optim.sgd.SGD"}, notebook, "x")
    for before in (old, {**old, "update": "torch"}):  # written before model.update existed, or with torch
        with pytest.raises(UsageError, match="trained with the optimizer torch's SGD or --optimizer's"):
            _refuse_changed_optimizer({"hyper_parameters": before}, notebook, Path("old.ckpt"))
        _refuse_changed_optimizer({"hyper_parameters": before}, torch_sgd, Path("old.ckpt"))


@pytest.mark.parametrize("marker,config", [("ud.append", DEEP), ("bnmean_running = 0.999", FIRST_BN)])
def test_the_update_is_the_notebooks_own_lines(marker, config, names_file):
    """The notebook's `# update` lines, read from cells 14 and 7 and run on random gradients, against the optimizer
    and scheduler the config builds (through the CLI, as fit does): bit for bit, across the learning-rate milestone
    (moved to step 3 in both, so that a few steps cross it). torch's SGD (the module's own) rounds once and differs."""
    from mm_lightning.cli import MakemoreCLI

    source = notebook_code(marker)
    update = re.search(r"^  # update\n(.*?)\n\n", source, re.M | re.S).group(1)
    rule = re.search(r"lr = ([\d.]+) if i < (\d+) else ([\d.]+)", update)
    spec = yaml.safe_load(config.read_text())
    lr, schedule = spec["optimizer"]["init_args"]["lr"], spec["lr_scheduler"]["init_args"]
    assert (lr, schedule["milestones"]) == (float(rule[1]), [int(rule[2])])
    # MultiStepLR's 0.1 * 0.1 is 0.010000000000000002, the notebook's literal 0.01: the same float32, which is what
    # `-lr * p.grad` multiplies by
    decayed = lr * schedule["gamma"]
    assert torch.tensor(decayed, dtype=torch.float32) == torch.tensor(float(rule[3]), dtype=torch.float32)
    update = update.replace(f"i < {rule[2]}", "i < 3")
    assert update.count("\n") == 2 and "p.data += -lr * p.grad" in update, update  # the rule and the loop, nothing else
    args = ["--config", str(config), "--data.path", str(names_file), "--lr_scheduler.init_args.milestones", "[3]"]
    module = MakemoreCLI(args, run=False).model
    initial = [p.detach().clone() for p in module.parameters()]

    def trained(how: str) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, value in zip(module.parameters(), initial, strict=True):
                p.copy_(value)
        params = list(module.parameters())
        if how != "notebook":  # the config's optimizer (the CLI's configure_optimizers), or the module's own
            own = MakemoreModule.configure_optimizers(module) if how == "torch" else module.configure_optimizers()
            optimizer, scheduler = own["optimizer"], own["lr_scheduler"]["scheduler"]
            assert own["lr_scheduler"]["interval"] == "step"  # it steps with every optimizer step, as i counts
        grads = torch.Generator().manual_seed(1)
        for i in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads) * 0.3
            if how == "notebook":
                with torch.no_grad():
                    exec(textwrap.dedent(update), {"i": i, "parameters": params})
            else:
                optimizer.step()
                scheduler.step()
        return [p.detach().clone() for p in params]

    notebook = trained("notebook")
    assert_bitwise(trained("config"), notebook)
    module.hparams.milestones = [3]  # the module's own SGD, its milestone moved too
    torch_sgd = trained("torch")
    assert not all(torch.equal(a, b) for a, b in zip(torch_sgd, notebook)), "torch's SGD would not be told apart"


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

    data = NotebookNamesDataModule(path=str(names_file))
    data.setup()
    data.follow_init_generator(torch.Generator().manual_seed(SEED).get_state())
    data.trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=1, global_step=0, max_steps=9)
    with pytest.raises(UsageError, match="use sampler steps with DDP"):
        data.train_dataloader()


@pytest.mark.slow
def test_what_the_notebook_options_cannot_honour_is_refused_in_one_line(project):
    def refused(*args: str) -> str:
        proc = run_cli(["fit", *args, "--trainer.max_steps", "1"], project, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert not list(project.glob("lightning_logs/version_*"))  # refused before a run directory is claimed
        return proc.stderr

    notebook_net = ("--model.net", "mm_lightning.lecture.NotebookMLPConfig")
    assert "set --model.net.init_seed" in refused("--data", "mm_lightning.lecture.NotebookNamesDataModule")
    assert "use kaiming or normal" in refused(*notebook_net, "--model.net.init_seed", "1", "--model.net.init", "torch")
    # two processes: refused before DDP starts them
    two = ("--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert "use sampler steps with DDP" in refused("--config", str(DEEP), *two)
    no_bn = ("--model.net.batchnorm", "false", "--model.net.output_batchnorm", "false")
    assert "has no effect without batchnorm" in refused(*notebook_net, "--model.net.bn_style", "lecture", *no_bn)
    # SyncBatchNorm would silently replace the lecture's BatchNorm with torch's
    assert "use bn_style torch with it" in refused(
        *notebook_net, "--model.net.bn_style", "lecture", "--trainer.sync_batchnorm", "true"
    )


# -------------------------------------------------------------------- the deep network, through the real commands


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory, names_file) -> Path:
    """`fit --config configs/lecture/notebook_deep.yaml` as a user runs it; its run directory."""
    root = tmp_path_factory.mktemp("notebook_deep")
    run_cli(["fit", "--config", str(DEEP), "--data.path", str(names_file), "--trainer.default_root_dir", "."], root)
    return root / "lightning_logs" / "version_0"


@pytest.mark.slow
def test_cell_14_and_15_step_0_loss_and_activation_table(deep_run):
    logged = scalars(deep_run)
    at = lambda tag: dict(logged[tag])[1000]  # noqa: E731 - the notebook's tables are of step i = 1000
    loss = re.fullmatch(r" *0/ *200000: ([\d.]+)", stored_output("ud.append")[0]).group(1)
    assert_printed(dict(logged["sampled/loss"])[0], loss, reduction_rtol(32), what="cell 14's loss")
    pattern = r"layer (\d+) \( *Tanh\): mean ([+-][\d.]+), std ([\d.]+), saturated: ([\d.]+%)"
    for line in stored_output("saturated: %.2f%%"):
        layer, mean, std, saturated = re.fullmatch(pattern, line).groups()
        name, n = f"net.layers.{layer}", 32 * 100  # the statistics of a (32, 100) batch of activations
        # the mean's terms have both signs: its slack is float32 rounding of terms of size ~std
        assert_printed(at(flat_tag(f"act/mean/{name}")), mean, 0, atol=reduction_rtol(n) * float(std), what=line)
        assert_printed(at(flat_tag(f"act/std/{name}")), std, reduction_rtol(n), what=line)
        # a count above 0.97: a last-bit difference may move one activation across the threshold, 1/n of them
        assert_printed(at(flat_tag(f"act/saturation/{name}")), saturated, 0, atol=100 / n, what=line)


@pytest.mark.slow
def test_cell_16_output_gradient_table(deep_run):
    logged = scalars(deep_run)
    at = lambda tag: dict(logged[tag])[1000]  # noqa: E731
    pattern = r"layer (\d+) \( *Tanh\): mean ([+-][\d.]+), std ([\d.e+-]+)"
    for line in stored_output("t = layer.out.grad"):
        layer, mean, std = re.fullmatch(pattern, line).groups()
        name, n = f"net.layers.{layer}", 32 * 100
        # the means are round-off around 0 (~1e-11: BatchNorm's gradient sums to zero), so their printed sign is
        # the sign of round-off: the notebook's own code run on this machine prints other signs. Digits only.
        grad_std = at(flat_tag(f"grad/std/{name}"))
        grad_mean = at(flat_tag(f"grad/mean/{name}"))
        assert_printed(grad_mean, mean, 0, atol=reduction_rtol(n) * grad_std, what=line)
        assert_printed(grad_std, std, reduction_rtol(n), what=line)


@pytest.mark.slow
def test_cell_17_weight_gradient_table(deep_run):
    """Each statistic to its printed digit, up to float32 rounding (reduction_rtol); grad:data as the notebook
    computes it, std(grad) / std(weights after step 1000's update) (last.ckpt), a ratio of two reductions. The
    diagnostics' own grad:data divides by the weights the gradient was computed for (before the update): within
    1e-4 of the notebook's, the size of step 1000's change to std(weights)."""
    logged = scalars(deep_run)
    at = lambda tag: dict(logged[tag])[1000]  # noqa: E731
    weights = torch.load(deep_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    names = ["net.embedding.weight"] + [f"net.layers.{i}.weight" for i in (0, 3, 6, 9, 12, 15)]
    pattern = r"weight +\((\d+), (\d+)\) \| mean ([+-][\d.]+) \| std ([\d.e+-]+) \| grad:data ratio ([\d.e+-]+)"
    for line, name in zip(stored_output("grad:data ratio"), names, strict=True):
        rows, cols, mean, std, ratio = re.fullmatch(pattern, line.strip()).groups()
        p = weights[name] if name == "net.embedding.weight" else weights[name].T  # the notebook's (fan_in, fan_out)
        assert tuple(p.shape) == (int(rows), int(cols))
        n = p.numel()
        grad_std = at(flat_tag(f"weight/grad_std/{name}"))
        grad_mean = at(flat_tag(f"weight/grad_mean/{name}"))
        assert_printed(grad_mean, mean, 0, atol=reduction_rtol(n) * grad_std, what=line)  # (a round-off 0's sign)
        assert_printed(grad_std, std, reduction_rtol(n), what=line)
        assert_printed(grad_std / p.std().item(), ratio, reduction_rtol(n, reductions=2), what=line)
        assert at(flat_tag(f"weight/grad_data_ratio/{name}")) == pytest.approx(float(ratio), rel=1e-4)


@pytest.mark.slow
def test_cell_19_split_losses(deep_run, names_file):
    """To the notebook's 17 printed digits, up to float32 rounding of a mean over the split (182625 and 22655
    terms: 2.1e-6 and 1.9e-6 of it); bit for bit against the notebook's own code in the slow test below."""
    from mm_lightning.lecture.reproduce import evaluate

    with one_thread():
        step, losses = evaluate(deep_run / "checkpoints" / "last.ckpt", str(names_file))
    assert step == 1001
    sizes = {"train": 182625, "val": 22655}
    for line in stored_output("layer.training = False"):
        split, printed = line.split()
        assert_printed(losses[split], printed, reduction_rtol(sizes[split]), what=line)


@pytest.mark.slow
def test_cell_20_names_sampled_one_at_a_time(deep_run):
    """The names exactly: a draw of torch.multinomial changes only if its uniform number falls within float32
    rounding (~1e-7) of a boundary between two characters' cumulative probabilities, about 1e-7 per draw, ~1e-5
    for the ~150 draws of twenty names."""
    ckpt = deep_run / "checkpoints" / "last.ckpt"
    proc = run_cli(["sample", "--ckpt_path", str(ckpt), "--one_at_a_time", "--seed", str(SEED + 10)], deep_run)
    assert proc.stdout.split() == [name.removesuffix(".") for name in stored_output("sample from the model")]
    parallel = run_cli(["sample", "--ckpt_path", str(ckpt), "--seed", str(SEED + 10)], deep_run).stdout.split()
    assert parallel != proc.stdout.split()  # all at once draws in another order: only one at a time is the notebook's


# ------------------------------------------------------------ bit for bit against the notebook's code, run here


def our_deep_state(checkpoint: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A deep run's parameters as cell 13's `parameters`, and its BatchNorm buffers (running mean, running var)."""
    from mm_lightning.runs import checkpoint_net, load_checkpoint

    net = checkpoint_net(load_checkpoint(checkpoint))
    state = net.state_dict()
    bns = [m for m in net.layers if isinstance(m, torch.nn.BatchNorm1d)]
    return as_notebook_parameters(state, net), [b for m in bns for b in (m.running_mean, m.running_var)]


def notebook_buffers(nb: dict) -> list[torch.Tensor]:
    bns = [layer for layer in nb["layers"] if hasattr(layer, "running_var")]
    return [b for layer in bns for b in (layer.running_mean, layer.running_var)]


@pytest.mark.slow
def test_the_deep_run_is_the_notebooks_code_bit_for_bit(deep_run, notebook_data, names_file):
    """Cells 13-14 as they stand, run here (1001 steps), against `fit --config notebook_deep.yaml`: every
    parameter and BatchNorm buffer bit for bit; then cell 19's printed losses and cell 20's names, the same."""
    nb = run_notebook(notebook_data, notebook_code("class BatchNorm1d"), notebook_code("ud.append"))
    params, buffers = our_deep_state(deep_run / "checkpoints" / "last.ckpt")
    assert_bitwise(params, nb["parameters"])
    assert_bitwise(buffers, notebook_buffers(nb))
    from mm_lightning.lecture.reproduce import evaluate

    with one_thread():
        _, losses = evaluate(deep_run / "checkpoints" / "last.ckpt", str(names_file))
    printed = run_notebook(nb, notebook_code("layer.training = False"))
    assert printed["printed"] == [f"train {losses['train']}", f"val {losses['val']}"]
    names = run_notebook(printed, notebook_code("sample from the model"))["printed"]
    ckpt = deep_run / "checkpoints" / "last.ckpt"
    proc = run_cli(["sample", "--ckpt_path", str(ckpt), "--one_at_a_time", "--seed", str(SEED + 10)], deep_run)
    assert proc.stdout.split() == [name.removesuffix(".") for name in names]


SHORT = 60  # steps of the short runs below; their learning-rate milestone moved to step 30, so they cross it


@pytest.mark.slow
@pytest.mark.parametrize("config", [DEEP_NOBN, FIRST_BN], ids=["deep_nobn", "first_batchnorm"])
def test_short_runs_are_the_notebooks_code_bit_for_bit(config, notebook_data, names_file, tmp_path, monkeypatch):
    """60 steps of `fit` with the config, against the notebook's code for them (cell 13 without BatchNorm and cell
    14, stopped after step 59; cells 6-7 with max_steps 60), both with the milestone at step 30."""
    from mm_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--data.path", str(names_file), "--trainer.max_steps", str(SHORT)]
    milestone = ("--lr_scheduler.init_args.milestones", "[30]")
    assert main([*args, *milestone, "--trainer.enable_model_summary", "false"]) == 0
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    if config == DEEP_NOBN:
        cell_13 = without_batchnorm(notebook_code("class BatchNorm1d"))
        cell_14 = notebook_code("ud.append", ("if i >= 1000:", f"if i >= {SHORT - 1}:"), ("i < 150000", "i < 30"))
        nb = run_notebook(notebook_data, cell_13, cell_14)
        assert_bitwise(our_deep_state(ckpt)[0], nb["parameters"])
        return
    cell_7 = notebook_code(
        "bnmean_running = 0.999", ("max_steps = 200000", f"max_steps = {SHORT}"), ("i < 100000", "i < 30")
    )
    nb = run_notebook(notebook_data, notebook_code("b2 = torch.randn"), cell_7)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    ours = [state[f"net.{k}"] for k in ("embedding.weight", "layers.0.weight", "layers.3.weight", "layers.3.bias")]
    ours[1:3] = [w.T for w in ours[1:3]]
    ours += [state[f"net.layers.1.{k}"] for k in ("weight", "bias", "running_mean", "running_std")]
    names = ["C", "W1", "W2", "b2", "bngain", "bnbias", "bnmean_running", "bnstd_running"]
    assert_bitwise(ours, [nb[name] for name in names])


@pytest.mark.slow
def test_validate_a_notebook_run_from_another_directory(deep_run, tmp_path, names_file):
    """The run's own config.yaml is the base for evaluating it, wherever the command runs."""
    ckpt = deep_run / "checkpoints" / "last.ckpt"
    proc = run_cli(["validate", "--ckpt_path", str(ckpt), "--data.path", str(names_file)], tmp_path)
    assert "2.3982" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_a_folded_notebook_checkpoint_samples_the_notebooks_names(deep_run, tmp_path):
    folded, trained = tmp_path / "folded.ckpt", deep_run / "checkpoints" / "last.ckpt"
    run_cli(["fold-batchnorm", "--ckpt_path", str(trained), "--out", str(folded)], tmp_path)
    proc = run_cli(["sample", "--ckpt_path", str(folded), "--one_at_a_time", "--seed", str(SEED + 10)], tmp_path)
    assert proc.stdout.split() == [name.removesuffix(".") for name in stored_output("sample from the model")]


@pytest.mark.slow
def test_the_notebooks_batchnorm_folds_like_torchs(deep_run, names_file):
    from mm_lightning.lecture.fold import fold_batchnorm
    from mm_lightning.runs import checkpoint_net, load_checkpoint

    net = checkpoint_net(load_checkpoint(deep_run / "checkpoints" / "last.ckpt")).eval()
    assert isinstance(net.layers[1], LectureBatchNorm1d)
    data = NamesDataModule(path=str(names_file))
    data.setup()
    x, _ = data.splits["val"].tensors()
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(net)(x), net(x), atol=1e-5, rtol=0)
        first = MLP(MLPConfig(n_hidden=200, n_layers=1, output_batchnorm=False, bn_style="lecture_first"))
        for i in range(0, 3200, 32):  # move its running mean and std away from 0 and 1
            first(x[i : i + 32])
        first.eval()
        assert isinstance(first.layers[1], LectureFirstBatchNorm1d)
        assert torch.allclose(fold_batchnorm(first)(x), first(x), atol=1e-5, rtol=0)


@pytest.mark.slow
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


@pytest.mark.reference  # not in the slow tier: -m reference alone runs it
def test_cells_7_and_10_the_single_layer_run(tmp_path, names_file):
    """Cell 10's split losses within 0.002 after the notebook's 200000 steps, and cell 7's curve beside the
    notebook's (about 7 minutes on 2 CPU cores; run with `pytest -m reference`)."""
    from mm_lightning.lecture.reproduce import main

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
