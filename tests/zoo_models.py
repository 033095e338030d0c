"""Tiny models people train today, healthy and broken, for tests/test_verdict_zoos.py (no downloads, no torchvision).

Each is a LightningModule small enough to train a few hundred steps on a CPU in a second or two. `num_classes`
where the output is a classification: the diagnostics then check the loss at step 0 against ln(classes).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------- data


def name_windows(names_file, block: int, n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, block) character windows of names.txt ('.' between names) and the next character of each position."""
    text = "." + ".".join(open(names_file).read().split()) + "."
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, len(ids) - block - 1, (n,), generator=g)
    x = torch.stack([ids[s : s + block] for s in start.tolist()])
    y = torch.stack([ids[s + 1 : s + block + 1] for s in start.tolist()])
    return x, y


def loader(*tensors, batch_size=32, shuffle=True):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=g
    )


def images(n=512, size=8, classes=4, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is the quadrant holding a bright square: learnable in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * h : r * h + h, q * h : q * h + h] += 1.0
    return x, y


def warmup_cosine(optimizer, warmup: int, total: int):
    """nanoGPT's schedule: linear warm-up from 0, then cosine decay to a tenth."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


# --------------------------------------------------------------------------------------------- healthy


class LectureMLP(L.LightningModule):
    """The lecture's deep net: embedding -> [Linear -> BatchNorm1d -> Tanh] x 4 -> Linear -> BatchNorm1d, SGD 0.1,
    kaiming 5/3 init, the last BatchNorm's gamma x 0.1."""

    num_classes = 27

    def __init__(self, hidden=64, layers=4, block=3, lr=0.1, batchnorm=True, gain=5 / 3, out_scale=0.1):
        super().__init__()
        self.lr, self.block = lr, block
        self.emb = nn.Embedding(27, 10)
        mods, width = [], 10 * block
        for _ in range(layers):
            linear = nn.Linear(width, hidden, bias=not batchnorm)
            nn.init.normal_(linear.weight, std=gain / width**0.5)
            mods += [linear, *([nn.BatchNorm1d(hidden)] if batchnorm else []), nn.Tanh()]
            width = hidden
        last = nn.Linear(width, 27)
        mods += [last, *([nn.BatchNorm1d(27)] if batchnorm else [])]
        self.net = nn.Sequential(*mods)
        with torch.no_grad():
            if batchnorm:
                self.net[-1].weight.mul_(out_scale)
            else:
                last.weight.mul_(out_scale)
                last.bias.zero_()

    def forward(self, x):
        return self.net(self.emb(x).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x[:, : self.block]), y[:, self.block - 1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.c_attn(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class NewGELU(nn.Module):
    """minGPT's own GELU (tanh approximation): an activation that is not a torch.nn module."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, act: type[nn.Module]):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), CausalSelfAttention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), act(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(L.LightningModule):
    """nanoGPT-style decoder (nn.GELU, LayerNorm, tied embedding/head, AdamW 1e-3 with warm-up and cosine, init
    std 0.02 and residual projections 0.02/sqrt(2 n_layer)); act=NewGELU makes it minGPT-style."""

    num_classes = 27

    def __init__(self, d=32, heads=4, n_layer=3, block=16, act: type[nn.Module] = nn.GELU, total=300, lr=1e-3):
        super().__init__()
        self.total, self.lr = total, lr
        self.wte, self.wpe = nn.Embedding(27, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, heads, act) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, 27, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
        )
        return {"optimizer": opt, "lr_scheduler": warmup_cosine(opt, 20, self.total)}


class PreLNResidualMLP(L.LightningModule):
    """x + W2 relu(W1 LayerNorm(x)) blocks: the residual stream grows with depth by design. Adam."""

    num_classes = 4

    def __init__(self, d=32, n_blocks=6, norm=True, init_std=None, lr=1e-3):
        super().__init__()
        self.lr = lr
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(d) if norm else nn.Identity(), nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)
            )
            for _ in range(n_blocks)
        )
        self.head = nn.Linear(d, 4)
        if init_std is not None:  # every block's Linear at this std (a residual branch as large as its input)
            for block in self.blocks:
                for m in block:
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, std=init_std)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class ViT(L.LightningModule):
    """A small ViT: Conv2d patch embedding, a cls token of std 1e-6 (as timm), learned positions, pre-LN blocks
    with nn.GELU, AdamW 1e-3."""

    num_classes = 4

    def __init__(self, d=32, heads=4, n_layer=2, patch=2, size=8):
        super().__init__()
        self.patch = nn.Conv2d(1, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 1e-6)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(d, heads) for _ in range(n_layer))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)


class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class ResNet(L.LightningModule):
    """ResNet-style CNN: conv-BN-ReLU stem, two residual blocks, global pooling; SGD momentum 0.9, weight decay."""

    num_classes = 4

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layers = nn.Sequential(ResBlock(c), ResBlock(c))
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class Recurrent(L.LightningModule):
    """A GRU (or LSTM) reading a sequence, Adam: the class is the sign of the sequence's sum (solved in ~100 steps,
    after which the GRU's outputs sit near +-1)."""

    num_classes = 2

    def __init__(self, cell: type[nn.RNNBase] = nn.GRU, hidden=16):
        super().__init__()
        self.rnn = cell(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def sequences(n=512, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 1, generator=g)
    return x, (x.sum((1, 2)) > 0).long()


class VAE(L.LightningModule):
    """A VAE on 8x8 binary images: ReLU encoder, reparameterisation, ReLU decoder, a Sigmoid output with BCE (its
    always-0 border pixels saturate it on purpose). Adam."""

    def __init__(self, z=4, hidden=32):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden, z), nn.Linear(hidden, z)
        self.dec = nn.Sequential(nn.Linear(z, hidden), nn.ReLU(), nn.Linear(hidden, 64), nn.Sigmoid())

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = self.dec(z)
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1).mean()
        return F.binary_cross_entropy(recon, x, reduction="none").sum(1).mean() + kl

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def binary_images(n=512, seed=0):
    """8x8 images: a random 4x4 block pattern in the middle, the border always 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 8, 8)
    x[:, 2:6, 2:6] = (torch.rand(n, 4, 4, generator=g) > 0.5).float()
    return (x.flatten(1),)


class FrozenBackbone(L.LightningModule):
    """A backbone with requires_grad=False left in the optimizer (as fine-tuning scripts do), a trained head."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def features(n=512, seed=0, dim=16):
    """Gaussian features whose class is the signs of the first two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


# ---------------------------------------------------------------------------------------------- broken


class MLP(L.LightningModule):
    """Linear -> activation stacks without normalisation, for the broken zoo."""

    num_classes = 4

    def __init__(
        self,
        act=nn.Tanh,
        depth=4,
        width=32,
        gain=1.0,
        first_bias=None,
        zero=False,
        lr=0.1,
        out_scale=1.0,
        optimizer="sgd",
    ):
        super().__init__()
        self.lr, self.optimizer = lr, optimizer
        mods, w = [], 16
        for _ in range(depth):
            linear = nn.Linear(w, width)
            nn.init.normal_(linear.weight, std=gain / w**0.5)
            nn.init.zeros_(linear.bias)
            mods += [linear, act()]
            w = width
        mods.append(nn.Linear(w, 4))
        self.net = nn.Sequential(*mods)
        with torch.no_grad():
            if first_bias is not None:
                mods[0].bias.fill_(first_bias)
            if zero:
                for p in self.parameters():
                    p.zero_()
            mods[-1].weight.mul_(out_scale)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class WithEMA(MLP):
    """An MLP with an EMA copy kept on the module (no gradients, not in the optimizer), updated after each step and
    used for a no-grad consistency target in training_step, as self-distillation recipes do."""

    def __init__(self):
        super().__init__(act=nn.ReLU, depth=2)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            target = self.ema(x).softmax(1)
        logits = self(x)
        return F.cross_entropy(logits, y) + 0.1 * F.cross_entropy(logits, target)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.lerp_(p, 0.01)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


class DefaultInitMLP(L.LightningModule):
    """Linear -> activation, twice, then a Linear head, with PyTorch's default nn.Linear init (kaiming_uniform with
    a=sqrt(5): weights of std 1/sqrt(3 fan_in)) and AdamW 1e-3: the most common recipe there is. Each hidden layer
    shrinks the activations' scale (by ~sqrt(1/6) behind a ReLU) at init, harmlessly in so shallow a stack."""

    num_classes = 4

    def __init__(self, act: type[nn.Module] = nn.ReLU, depth: int = 2, width: int = 64, lr: float = 1e-3, scale=1.0):
        """scale: every parameter times this after the default init (broken: x100 huge, x0.1 tiny)."""
        super().__init__()
        self.lr = lr
        mods, w = [], 16
        for _ in range(depth):
            mods += [nn.Linear(w, width), act()]
            w = width
        self.net = nn.Sequential(*mods, nn.Linear(w, 4))
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
