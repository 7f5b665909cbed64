"""Run by `make wheel-check` from an installed wheel, outside the checkout: an
op against its formula and a few training steps of a module."""

import torch

import fastmeta
from fastmeta import formulas, ops
from fastmeta.data import Characters, EpisodeSampler
from fastmeta.nn import Conv4, PrototypicalNetworks

assert "site-packages" in fastmeta.__file__, f"fastmeta imported from {fastmeta.__file__}, not the wheel"
x, y = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
torch.testing.assert_close(ops.pairwise_distance(x, y), formulas.pairwise_distance(x, y))
sampler = EpisodeSampler(Characters(split="train"), ways=5, shots=1, queries=2, episodes_per_batch=2, seed=0)
model = PrototypicalNetworks(Conv4(1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for _ in range(3):
    e = sampler.sample()
    loss = model.loss(e.support, e.support_labels, e.query, e.query_labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
assert torch.isfinite(loss)
print(f"wheel smoke test passed: fastmeta {fastmeta.__version__} from {fastmeta.__file__}")
