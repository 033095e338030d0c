"""Health verdicts: is training healthy, judged from one sampled step's statistics (and the update history).

Each rule is a rule of thumb from the lecture (an SGD-trained tanh MLP), so each one says when it applies and is
silent (or passes, saying "not judged" and why) where it does not; `Context` tells it what is trained how:
- saturation and dead units: hidden layers only. An output layer (no parameterised module runs after it, as a
  VAE's Sigmoid before BCE) saturates on purpose; a recurrent layer's output is a gated mix whose gradient also
  flows through its gates and cell, so its |h| near 1 blocks nothing (a GRU after its task is solved).
- activation and gradient std ratios: within one kind of layer in one part of the model, and only where that part
  has no normalisation layer. Gain decides the scale only without normalisation (the lecture's point: with
  BatchNorm the gain hardly matters); a residual stream behind LayerNorms grows with depth by design (a pre-LN
  residual MLP at init: 0.23 -> 0.62; GPT-style models after a few dozen steps). The lecture's activation band is
  for saturating activations (Tanh, Sigmoid, ...: those with a saturation statistic), where the scale decides
  whether a unit is linear or saturated; a non-saturating one (ReLU, GELU, SiLU, ...) behaves alike at any scale,
  so only an extreme change is reported (PyTorch's default init shrinks three ReLU layers 0.34 -> 0.07, healthy).
  Two saturating layers get a wider band than a stack: one step from the input's scale is not a gain compounding.
  Gradients: Adam-like optimizers move each weight by about lr whatever its gradient's size, so only an extreme
  ratio is reported there (the first layer's gradient near Adam's eps); SGD keeps the lecture's band.
- update ratio: weights with a gradient (a frozen parameter left in the optimizer is said so, not "barely learns"),
  with a band per optimizer family (SGD: the lecture's; Adam-like: its own, see HealthThresholds), judged at the
  learning rate the user set (a warm-up or a decayed schedule is not "barely learns"), and "too high" only while the
  ratio is not falling (a parameter growing out of a tiny init, like a ViT's cls_token, starts high by design),
  except under an Adam-like learning rate at or above the weights' natural scale 1/sqrt(fan_in): reported at once.
  "Barely learns" on a weight far above any init's scale names the init, not the learning rate.

The defaults are calibrated on the lecture's stories at init: the deep BatchNorm net (tanh std 0.64, 3% saturated)
and the 5/3-gain net without BatchNorm (first layer 20% saturated) pass; gain 1 without BatchNorm (activations
shrinking 0.62 -> 0.31 over five layers) and gain 3 (40-47% saturated) fail. tests/test_verdict_zoos.py holds the
healthy models (no failing verdict at any sample) and the broken ones (caught, naming the layer) they were checked on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .snapshot import LayerStats, Snapshot

CHECKS = (
    "nonfinite",
    "initial_loss",
    "saturation",
    "dead_units",
    "activation_std_ratio",
    "gradient_std_ratio",
    "update_ratio",
)


@dataclass(frozen=True)
class HealthThresholds:
    """When a verdict fails."""

    max_saturation: float = 0.30
    """Largest fraction of a bounded activation's outputs past the saturation threshold (|tanh| > 0.97)."""
    max_dead: float = 0.05
    """Largest fraction of a layer's units that are saturated or constant over the whole batch (and positions)."""
    max_dead_few_values: float = 0.5
    """The same for an unbounded activation (ReLU, GELU, ...) whose units are each seen in fewer than
    dead_evidence values (one small batch of per-feature units): a unit zero on 32 examples may fire on others.
    Measured: a healthy VAE's ReLU encoder (Adam, batches of 32) has up to 37% of its units zero over a batch (6-15%
    dead over the whole data set); ReLUs behind a bias of -10 are 100% dead."""
    dead_evidence: int = 256
    """Values per unit (batch x positions) from which max_dead applies to unbounded activations: a conv channel
    over a batch of 32 8x8 images has 2048, a Linear's unit over a batch of 32 has 32."""
    activation_std_ratio: float = 0.6
    """std of the last watched layer's output over the first's must lie in [r, 1/r] in a stack of three or more
    saturating layers of one kind (Tanh, Sigmoid, ...: with a saturation statistic): beyond, activations shrink
    into the linear regime (or grow into saturation) layer by layer, the lecture's gain argument. Compared within
    one kind of layer in one part of the model only. The lecture: gain 1 without BatchNorm shrinks 0.62 -> 0.31
    over five tanh layers (caught); gain 5/3 passes. PyTorch's default init is below gain 1 and is caught too
    behind three Tanh layers (tests/zoo_models.DefaultInitMLP(nn.Tanh, depth=3), AdamW 1e-3: 0.461 -> 0.160)."""
    activation_std_ratio_pair: float = 0.2
    """The same band, [r, 1/r], for two saturating layers of one kind (one step). Their ratio is not a gain
    compounding layer by layer: the first layer's scale is set by the input (normalised features, an embedding of
    std 1), the second's by the network. Measured: DefaultInitMLP(nn.Tanh), 2 layers, AdamW 1e-3: 0.54 at init,
    up to 1.35 by step 260 (loss 1.39 -> 0.11 in 300 steps)."""
    activation_std_ratio_unbounded: float = 0.01
    """The band [r, 1/r] for non-saturating activations (ReLU, LeakyReLU, GELU, SiLU, ...; also watched blocks and
    Linear layers: no saturation statistic), whatever the number of layers. They are (nearly) positively
    homogeneous: a change of scale from layer to layer changes no unit's behaviour, so only an extreme change is
    reported (a residual stream exploding without normalisation; a vanishing signal is caught by its gradients,
    gradient_std_ratio). Measured, std of the last layer's output over the first's, at init and every 10 steps of
    300 (tests/zoo_models.DefaultInitMLP: PyTorch's default init, AdamW 1e-3, features(), seed 0, all healthy):
    ReLU 2 layers 0.4 .. 1.8, 3 layers 0.19 (init) .. 3.4 (step 260, loss 1.39 -> 0.033), 6 layers 0.12 .. 7.2
    (step 270, loss -> 0.007); GELU 3 layers 0.14 .. 4.4 (step 290, loss -> 0.028), 6 layers 0.10 .. 9.0 (step
    280, loss -> 0.012). The same at a tenth of that init, which trains as well (2 and 3 layers reach loss 0.09
    and 0.03 in 300 steps, as the default init does): 0.11 .. 13; 6 layers (broken, see adaptive_gradient_std_ratio):
    0.11 at init, up to 40. Broken: an 8-block residual ReLU MLP without normalisation, Linears at std 0.5
    (tests' exploding residual stream): 1.04 -> 2.9e6 at init; four ReLU layers without biases at a tenth of
    kaiming's scale (zoo_models.MLP(nn.ReLU, gain=0.1)): 3.1e-4 at init, SGD 0.1 leaves its loss at 1.39 over 300
    steps (at kaiming's scale: 1.54 -> 0.018, ratio 0.92)."""
    gradient_std_ratio: float = 10.0
    """std of the first watched layer's output gradient over the last's must lie in [1/r, r]: beyond, gradients
    vanish (or explode) on their way back. Compared within one kind of layer in one part of the model only. Under
    SGD-like (or unknown) optimizers: a weight's step is proportional to its gradient."""
    adaptive_gradient_std_ratio: float = 1e4
    """The band [1/r, r] where every parameter of that part of the model is under an Adam-like optimizer: it moves
    each weight by about lr a step whatever its gradient's size, until the gradient falls to its eps (1e-8 by
    default), so only an extreme ratio harms. Measured (DefaultInitMLP, AdamW 1e-3, at init and every 10 steps of
    300, seed 0): healthy ReLU 6 layers 0.012 (init) .. 20, GELU 6 layers 0.0022 (init) .. 32, GELU 3 layers
    0.078 .. 10.3; ReLU 3 layers at a tenth of the default init 0.0017 .. 13 (loss 1.39 -> 0.031). Broken: 6 layers
    at a tenth of the default init, 1.4e-7 (ReLU) and 2.0e-8 (GELU) at init (the first layer's output gradient
    3e-11: its weights' gradients far below eps), loss 1.39 -> 0.90 (0.71) in 300 steps against 0.007 (0.012) at
    the default init; the exploding residual stream above (Adam): 2.0e6."""
    update_ratio_low: float = -4.0
    """SGD-like optimizers: log10(update:data), at the learning rate set (see Context.lr_shortfall), below this for
    update_ratio_window samples in a row: the parameter barely learns. The lecture: ~-3 is healthy."""
    update_ratio_high: float = -1.0
    """SGD-like optimizers: log10(update:data) above this for update_ratio_window samples in a row, and not falling:
    updates too large (each step moves the weights by a tenth of their spread: the lecture's "e.g. -1, too fast").
    Not the lecture's -2: its own deep net's last layer sits at -1.9 at init (grad:data 0.116 x lr 0.1), and the same
    recipe (tests' lecture-mlp-sgd) keeps its last Linear at -1.6 ... -1.8 over 300 healthy steps."""
    adaptive_update_ratio_low: float = -4.0
    """Adam-like optimizers (Adam, AdamW, RMSprop, Adagrad, ...): an update is at most about lr per element whatever
    the gradient's size (less where the gradient is mostly noise: a ViT's patch embedding at lr 1e-3 and weights of
    std 0.29 sits at -4.2 after 250 healthy steps). So "barely learns" needs both the ratio and lr set / std(weights)
    below this: the learning rate is 1e-4 of the weights' scale (lr 1e-7 on weights of std 0.1: -6; fine-tuning at
    lr 1e-5 on std-0.02 weights: -3.3)."""
    adaptive_update_ratio_high: float = -0.5
    """Adam-like optimizers: above this (each step moves the weights by a third of their spread), sustained and not
    falling. Healthy AdamW at lr 1e-3 on std-0.02 weights sits at -1.3 (measured on a nanoGPT-style model whose
    loss fell 3.5 -> 0.57); lr 1e-2, where such models diverge, gives -0.3."""
    update_ratio_falling: float = 0.3
    """A ratio that fell by more than this (log10) over the window is settling, not "too high": a parameter
    growing from a tiny or zero init (a cls_token of std 1e-6, a position embedding of zeros) starts far above."""
    update_ratio_window: int = 10
    """Consecutive sampled steps an update ratio must stay out of range before it is reported, or fewer (at least
    update_ratio_min_samples) where they span update_ratio_window_steps optimizer steps: sampled every 20 steps, a
    200-step run has 10 samples, the last at step 180; the step span judges it at step 100."""
    update_ratio_window_steps: int = 100
    """Optimizer steps an update ratio out of range over consecutive samples is reported after (see above)."""
    update_ratio_min_samples: int = 3
    """Fewest consecutive samples an update ratio is judged on (sampled every 50 steps: at step 100)."""
    adaptive_lr_per_weight_scale: float = 0.0
    """Adam-like optimizers: log10(lr set x sqrt(fan_in)) at or above this, with the update ratio above the band, is
    reported at once ("learning rate too high"), unsustained, falling or not. Adam moves each weight by about lr a
    step; a layer keeping its output's scale has weights of about 1/sqrt(fan_in) (PyTorch's default: 0.58 of it), so
    lr at that scale replaces the weights each step. AdamW at lr 100 on a 16-input layer: +2.6 (its weights are
    replaced, then decayed to zero: lr x weight decay = 1). Healthy: a ViT's cls_token (std 1e-6, 32 features) at lr
    1e-3 starts with an update ratio of +3 but sits at -2.2 here; nanoGPT-style at 1e-3, fan_in 128: -1.9."""
    max_weight_scale: float = 30.0
    """A weight whose std is above this many times 1/sqrt(fan_in) is far above any init's scale (PyTorch's default:
    0.58, kaiming for ReLU 1.41, an nn.Embedding's N(0, 1) with 64 features: 8): a "barely learns" verdict there
    names the init, not the learning rate. Default init x100 under AdamW 1e-3: 58, its update ratio -4.5 because the
    weights are huge, not because the learning rate is small."""
    initial_loss_tolerance: float = 0.5
    """Largest |loss at step 0 - ln(classes)|: a bigger gap means the initial predictions are confidently wrong."""


def _comparable(layers: list[LayerStats]) -> dict[tuple[str, str], list[LayerStats]]:
    """Layers whose stds may be compared: one kind (Tanh with Tanh) in one role (a block's linear1 with the next
    block's linear1, not with its linear2; the role is the module's attribute name, unless it is an index) in one
    part of the model (see select.groups), in forward order. A GAN's generator is not compared with its
    discriminator, a ReLU with a Sigmoid, a reused module's second call (named name#2) with its first."""
    out: dict[tuple[str, str], list[LayerStats]] = {}
    for x in layers:
        if "#" not in x.name:
            last = x.name.rsplit(".", 1)[-1]
            role = "" if last.isdigit() or "." not in x.name else f" {last}"
            out.setdefault((x.group, x.kind + role), []).append(x)
    return out


# optimizer classes (by name, so that torch_optimizer's, bitsandbytes' and apex's count too) whose update is
# normalised per element, about lr whatever the gradient's size
ADAPTIVE_OPTIMIZERS = frozenset(
    "Adam AdamW Adamax NAdam RAdam SparseAdam Adagrad Adadelta RMSprop Lion Adafactor LAMB Lamb AdamW8bit Adam8bit "
    "PagedAdamW FusedAdam FusedLAMB".split()
)
SGD_OPTIMIZERS = frozenset("SGD ASGD LARS FusedSGD".split())
RECURRENT_KINDS = frozenset({"RNN", "LSTM", "GRU"})


def optimizer_family(optimizer) -> str:
    """'adaptive', 'sgd' or '' (unknown: update ratios are not judged), from the class or one of its bases."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ in ADAPTIVE_OPTIMIZERS:
            return "adaptive"
        if cls.__name__ in SGD_OPTIMIZERS:
            return "sgd"
    return ""


@dataclass
class Context:
    """What the statistics cannot say: how each part is trained and what role each layer plays (plain values)."""

    optimizer: dict[str, str] = field(default_factory=dict)
    """parameter -> its optimizer's family ('adaptive', 'sgd', '': unknown, not judged)"""
    lr_shortfall: dict[str, list[float]] = field(default_factory=dict)
    """parameter -> log10(learning rate set / learning rate used) at each sample of the update history (aligned
    with it): a warm-up or a decayed schedule. The learning rate set is the scheduler's base ('initial_lr')."""
    lr_set: dict[str, float] = field(default_factory=dict)
    """parameter -> the learning rate set (the scheduler's base), for Adam-like optimizers' 'barely learns'"""
    frozen: set[str] = field(default_factory=set)
    """parameters without a gradient at the sample (requires_grad=False, or unused): not trained"""
    output_layers: set[str] = field(default_factory=set)
    """watched layers after which no parameterised module runs: the model's output, saturated on purpose"""
    normalised_groups: set[str] = field(default_factory=set)
    """parts of the model (see select.groups) that hold a normalisation layer (*Norm*): std ratios not judged"""
    history_steps: dict[str, list[int]] = field(default_factory=dict)
    """parameter -> the step of each sample of the update history (aligned with it): the window's span in steps"""
    tables: set[str] = field(default_factory=set)
    """lookup tables (nn.Embedding, nn.EmbeddingBag weights): a row moves only in the steps its index occurs"""


@dataclass
class Verdict:
    check: str  # one of CHECKS
    subject: str  # the layer or parameter concerned, "" for the whole model
    ok: bool
    message: str


def judge(
    snapshot: Snapshot,
    t: HealthThresholds,
    expected_loss: float | None = None,
    update_history: dict[str, list[float]] | None = None,
    context: Context | None = None,
) -> list[Verdict]:
    """Every verdict for this snapshot, passing and failing, in the order of CHECKS. Without a context every rule
    applies to every layer and weight (SGD's band), as in the lecture."""
    out: list[Verdict] = [_nonfinite(snapshot)]
    layers, weights = snapshot.layers, snapshot.weights
    c = context or Context()

    if snapshot.step == 0 and expected_loss is not None and snapshot.loss is not None:
        gap = abs(snapshot.loss - expected_loss)
        out.append(
            Verdict(
                "initial_loss",
                "",
                gap <= t.initial_loss_tolerance,
                f"loss at step 0 is {snapshot.loss:.4f}, ln(classes) = {expected_loss:.4f}"
                + (
                    ""
                    if gap <= t.initial_loss_tolerance
                    else ": the initial predictions are confidently wrong; scale the output layer's weights down "
                    "(x0.1) and its bias to zero"
                ),
            )
        )

    # hidden layers only: an output layer saturates on purpose, a recurrent layer's gradient has its gates' path
    hidden = [x for x in layers if x.name not in c.output_layers and x.kind not in RECURRENT_KINDS]
    for x in hidden:
        if x.saturation is not None:
            ok = x.saturation <= t.max_saturation
            out.append(
                Verdict(
                    "saturation",
                    x.name,
                    ok,
                    f"{x.name} ({x.kind}) {100 * x.saturation:.1f}% saturated"
                    + (
                        ""
                        if ok
                        else f" (> {100 * t.max_saturation:.0f}%): its gradients are blocked; lower the gain of the "
                        "layer feeding it (or normalise its input)"
                    ),
                )
            )
    for x in hidden:
        if x.values_per_unit is not None and x.values_per_unit < 2:  # a batch of one: every unit is "constant"
            message = f"{x.name} ({x.kind}): one value per unit in this batch: dead units cannot be told (not judged)"
            out.append(Verdict("dead_units", x.name, True, message))
            continue
        few = x.saturation is None and x.values_per_unit is not None and x.values_per_unit < t.dead_evidence
        ok = x.dead <= (t.max_dead_few_values if few else t.max_dead)
        fix = "lower the init scale feeding it" if x.saturation is not None else "check its bias and learning rate"
        out.append(
            Verdict(
                "dead_units",
                x.name,
                ok,
                f"{x.name} ({x.kind}) {100 * x.dead:.1f}% of units dead"
                + ("" if ok else f" (saturated or constant for the whole batch): they never learn; {fix}"),
            )
        )

    for (group, kind), same in _comparable(layers).items():  # first and last layer of one kind in one part
        first, last = same[0], same[-1]
        subject = f"{group} {kind}".strip()
        normalised = group in c.normalised_groups
        saturating = first.saturation is not None  # the lecture's gain argument holds for these only
        if len(same) >= 2 and first.std > 0 and math.isfinite(last.std):
            r = last.std / first.std
            if not saturating:
                band = t.activation_std_ratio_unbounded
            else:
                band = t.activation_std_ratio if len(same) >= 3 else t.activation_std_ratio_pair
            lo, hi = band, 1 / band
            ok = normalised or lo <= r <= hi
            message = f"activation std {_num(first.std)} -> {_num(last.std)} from {first.name} to {last.name} ({kind})"
            if normalised:
                message += f" (not judged: {group or 'the model'} normalises its layers' inputs)"
            elif not ok and saturating:
                message += (
                    f": activations {'shrink' if r < lo else 'grow'} layer by layer; the gain is too "
                    f"{'low' if r < lo else 'high'} (in a residual network: normalise each block's input, or scale "
                    "its last layer's init down)"
                )
            elif not ok:
                message += (
                    f": activations {'shrink' if r < lo else 'grow'} {max(r, 1 / r):.3g}x from first to last "
                    f"(beyond {hi:g}x); {'raise' if r < lo else 'lower'} the init scale of the layers feeding them "
                    "(kaiming: std sqrt(2/fan_in) behind a ReLU), or in a residual network normalise each block's "
                    "input, or scale its last layer's init down"
                )
            out.append(Verdict("activation_std_ratio", subject, ok, message))
        grads = [x for x in same if x.grad_std is not None]
        if len(grads) >= 2 and grads[-1].grad_std and grads[-1].grad_std > 0 and math.isfinite(grads[0].grad_std):
            r = grads[0].grad_std / grads[-1].grad_std
            adaptive = _family(group, c) == "adaptive"
            limit = t.adaptive_gradient_std_ratio if adaptive else t.gradient_std_ratio
            ok = normalised or 1 / limit <= r <= limit
            message = (
                f"output-gradient std {grads[0].grad_std:.2e} ({grads[0].name}) vs {grads[-1].grad_std:.2e} "
                f"({grads[-1].name}, {kind})"
            )
            if normalised:
                message += f" (not judged: {group or 'the model'} normalises its layers' inputs)"
            elif not ok:
                message += f": gradients {'vanish' if r < 1 else 'explode'} on their way back" + (
                    f" ({max(r, 1 / r):.2g}x: beyond what an Adam-like optimizer's per-weight scaling absorbs)"
                    if adaptive
                    else ""
                )
                if r >= 1:
                    fix = "gain" if saturating else "init scale"
                    message += f"; lower the {fix}, or add normalisation layers"
                elif saturating:
                    message += "; use a non-saturating activation, a 5/3-style gain, or normalisation layers"
                else:
                    message += (
                        "; raise the init scale (kaiming: std sqrt(2/fan_in) behind a ReLU), or add normalisation "
                        "layers"
                    )
            out.append(Verdict("gradient_std_ratio", subject, ok, message))

    out += _update_ratios(weights, t, update_history or {}, c, judged_by_family=context is not None)
    return out


def _num(x: float) -> str:
    """0.340, or 1.90e-05 and 2.87e+06 where three decimals would say 0.000 or a long run of digits."""
    return f"{x:.3f}" if 1e-3 <= abs(x) < 1e3 else f"{x:.2e}"


def _family(group: str, c: Context) -> str:
    """The optimizer family of every parameter in `group` (the whole model for ""), or "" where they differ or
    none is known."""
    families = {f for name, f in c.optimizer.items() if not group or name.startswith(group + ".")}
    return families.pop() if len(families) == 1 else ""


def _nonfinite(snapshot: Snapshot) -> Verdict:
    """The first layer (forward order) whose output or output gradient holds NaN/Inf, even once the loss has; else
    the first such parameter or gradient, else the loss."""
    layers = [x for x in snapshot.layers if not all(map(math.isfinite, (x.mean, x.std)))]
    grads = [x for x in snapshot.layers if x.grad_std is not None and not math.isfinite(x.grad_std)]
    params = [p for p in snapshot.params if not math.isfinite(p.data_std)]
    pgrads = [p for p in snapshot.params if p.grad_std is not None and not math.isfinite(p.grad_std)]
    where = (
        [f"{x.name} ({x.kind}, its output)" for x in layers]
        + [f"{x.name} ({x.kind}, its output gradient)" for x in grads[-1:]]  # gradients flow backwards: the last
        + [f"{p.name} (the parameter)" for p in params]
        + [f"{p.name} (its gradient)" for p in pgrads]
    )
    subjects = [x.name for x in layers] + [x.name for x in grads[-1:]] + [p.name for p in params + pgrads]
    loss_bad = snapshot.loss is not None and not math.isfinite(snapshot.loss)
    if not where and not loss_bad:
        return Verdict("nonfinite", "", True, "all finite")
    loss = "the loss is NaN/Inf; " if loss_bad else ""
    first = f"first in {where[0]}" if where else "no watched layer or parameter holds one yet"
    return Verdict(
        "nonfinite",
        subjects[0] if subjects else "the loss",
        False,
        f"step {snapshot.step}: {loss}NaN/Inf {first}: lower the learning rate (or clip gradients); check the input "
        "data if it happens at step 0",
    )


def _update_ratios(weights, t: HealthThresholds, history, c: Context, judged_by_family: bool) -> list[Verdict]:
    out = []
    for p in weights:
        current = p.log10_update_ratio
        shown = "n/a" if current is None else f"{current:.2f}"
        family = c.optimizer.get(p.name, "") if judged_by_family else "sgd"
        if p.name in c.frozen:
            out.append(Verdict("update_ratio", p.name, True, f"{p.name} has no gradient (frozen): not judged"))
            continue
        if not family:
            message = f"{p.name} log10(update:data) {shown} (not judged: an optimizer of unknown family)"
            out.append(Verdict("update_ratio", p.name, True, message))
            continue
        low, high = (
            (t.adaptive_update_ratio_low, t.adaptive_update_ratio_high)
            if family == "adaptive"
            else (t.update_ratio_low, t.update_ratio_high)
        )
        values = history.get(p.name, [])
        n = _window(values, c.history_steps.get(p.name, []), t)
        recent = values[-n:]
        shortfall = c.lr_shortfall.get(p.name, [])[-n:]
        if len(shortfall) != len(recent):
            shortfall = [0.0] * len(recent)
        at_set_lr = [v + s for v, s in zip(recent, shortfall)]  # as if the schedule ran at the learning rate set
        full = len(recent) >= n
        # a lookup table's update:data is its whole table's: with more rows than a batch's indices (a 1000-token
        # vocabulary, batches of a few hundred tokens) most rows are untouched in a step, so the ratio understates
        # the rows that learn by an unknown factor. Lightning's demo Transformer (vocab 1000, SGD 0.1) sits at -4.1
        # at step 200. Not judged "barely learns"; "too high" still is (the table's ratio only understates).
        too_low = full and all(v < low for v in at_set_lr) and p.name not in c.tables
        # an update of exactly 0 (log10 -inf) under a decayed schedule is float32 underflow of lr x grad (StepLR at
        # 1e-12): no evidence about the learning rate set, whatever its shortfall says
        too_low = too_low and not any(math.isinf(v) and s > 0.05 for v, s in zip(recent, shortfall))
        lr_set = c.lr_set.get(p.name)
        sized = p.data_std > 0 and math.isfinite(p.data_std)
        if family == "adaptive" and lr_set is not None and sized:
            too_low = too_low and math.log10(lr_set / p.data_std) < low  # noisy gradients shrink Adam's steps too
        falling = full and recent[0] - recent[-1] > t.update_ratio_falling
        too_high = full and all(v > high for v in recent) and not falling
        fan_in = math.prod(p.shape[1:])
        # Adam moves each weight by about lr: at or above the weights' natural scale 1/sqrt(fan_in), at once
        lr_vs_scale = math.log10(lr_set * math.sqrt(fan_in)) if family == "adaptive" and lr_set else -math.inf
        swamped = current is not None and current > high and lr_vs_scale >= t.adaptive_lr_per_weight_scale
        weight_scale = p.data_std * math.sqrt(fan_in) if sized else 0.0  # std in units of 1/sqrt(fan_in)
        message = f"{p.name} log10(update:data) {shown}"
        if swamped:
            message += (
                f", above {high:g} at lr {lr_set:g}: Adam moves each weight by about the learning rate a step, "
                f"{10**lr_vs_scale:.3g}x the scale 1/sqrt(fan_in) = {1 / math.sqrt(fan_in):.3g} of weights that keep "
                "their layer's output scale, so every step replaces the weights: the learning rate is too high; "
                f"lower it (well below {1 / math.sqrt(fan_in):.2g})"
            )
        elif too_low:
            scheduled = any(abs(s) > 0.05 for s in shortfall)
            message += f", below {low:g} for {len(recent)} samples" + (
                " (at the learning rate set, not the schedule's)" if scheduled else ""
            )
            if weight_scale > t.max_weight_scale:
                message += (
                    f": it barely learns because its weights are huge (std {p.data_std:.3g}, {weight_scale:.0f}x the "
                    "scale 1/sqrt(fan_in) that keeps a layer's output scale), not because the learning rate is low; "
                    "scale its init down (std about 1/sqrt(fan_in))"
                )
            else:
                message += ": it barely learns; raise the learning rate"
        elif too_high:
            band = "Adam-like" if family == "adaptive" else "SGD"
            message += (
                f", above {high:g} for {len(recent)} samples and not settling ({band} band): it changes too fast; "
                "lower the learning rate"
            )
        too_high = too_high or swamped
        out.append(Verdict("update_ratio", p.name, not (too_low or too_high), message))
    return out


def _window(values: list[float], steps: list[int], t: HealthThresholds) -> int:
    """How many of the latest samples an update ratio is judged on: update_ratio_window, or fewer (at least
    update_ratio_min_samples) where they already span update_ratio_window_steps steps (sampled sparsely)."""
    if len(steps) == len(values):
        for n in range(t.update_ratio_min_samples, min(t.update_ratio_window, len(steps)) + 1):
            if steps[-1] - steps[-n] >= t.update_ratio_window_steps:
                return n
    return t.update_ratio_window
