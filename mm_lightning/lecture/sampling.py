"""One name after another, as the lecture's notebook samples (cell 20): with its generator,
torch.Generator().manual_seed(2147483647 + 10), its twenty names; one forward pass per character. The core's
generate() draws every name at once, in another order of random draws.

    generate(net, 20, generator=g, draw=words_one_at_a_time)      # or: sample --one_at_a_time
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_lightning.model import MLP


def words_one_at_a_time(net: MLP, num_samples: int, temperature: float, generator, max_length: int) -> list[list[int]]:
    device = net.embedding.weight.device
    words = []
    for _ in range(num_samples):
        context, word = [0] * net.config.block_size, []
        while len(word) < max_length:
            probs = F.softmax(net(torch.tensor([context], device=device)) / temperature, dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=generator).item()
            if ix == 0:
                break
            word.append(ix)
            context = context[1:] + [ix]
        words.append(word)
    return words
