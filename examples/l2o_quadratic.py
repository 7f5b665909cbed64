"""Learning to learn by gradient descent by gradient descent (Andrychowicz et
al. 2016) on random 10-dimensional quadratics f(theta) = ||W theta - y||^2.

Meta-trains a fastmeta.nn.CoordinatewiseLSTM with truncated unrolls (20 steps
within a 100-step horizon), then compares the mean loss after 100 steps on
held-out quadratics with Adam, RMSprop, SGD and Nesterov momentum, each with
its learning rate tuned on a grid (on separate validation quadratics).

    python examples/l2o_quadratic.py [--meta-iterations 2000]
"""

import argparse
import time

import torch

import fastmeta

DIM, STEPS = 10, 100


def quadratics(n, generator):
    """A batch of n problems; each is optimized independently, the loss is summed."""
    W = torch.randn(n, DIM, DIM, generator=generator)
    y = torch.randn(n, DIM, generator=generator)
    theta0 = torch.randn(n, DIM, generator=generator)

    def loss(theta):
        return ((torch.einsum("nij,nj->ni", W, theta) - y) ** 2).sum(-1)  # [n]

    return loss, theta0


def run_learned(lstm, problems):
    loss_fn, theta = problems
    state = None
    with torch.no_grad():
        for _ in range(STEPS):
            with torch.enable_grad():
                probe = theta.detach().requires_grad_()
                (grad,) = torch.autograd.grad(loss_fn(probe).sum(), probe)
            update, state = lstm(grad, state)
            theta = theta + update
        return loss_fn(theta).mean().item()


def run_hand_designed(make_optimizer, problems):
    loss_fn, theta0 = problems
    theta = theta0.clone().requires_grad_()
    opt = make_optimizer([theta])
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(theta).sum().backward()
        opt.step()
    with torch.no_grad():
        loss = loss_fn(theta).mean().item()
    return loss if loss == loss else float("inf")  # a diverged run counts as infinitely bad


OPTIMIZERS = {
    "Adam": lambda lr: lambda p: torch.optim.Adam(p, lr=lr),
    "RMSprop": lambda lr: lambda p: torch.optim.RMSprop(p, lr=lr),
    "SGD": lambda lr: lambda p: torch.optim.SGD(p, lr=lr),
    "NAG": lambda lr: lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
}
LEARNING_RATES = [10 ** (e / 4) for e in range(-20, 5)]  # 1e-5 .. 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-iterations", type=int, default=2000, help="horizons of 100 steps to meta-train on")
    parser.add_argument("--batch", type=int, default=128, help="quadratics per horizon")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=20, num_layers=2)
    meta_opt = torch.optim.Adam(lstm.parameters(), lr=1e-3)
    validation = quadratics(256, gen)
    test = quadratics(1024, gen)
    start = time.perf_counter()
    best, best_state = float("inf"), None
    for it in range(1, args.meta_iterations + 1):
        loss_fn, theta0 = quadratics(args.batch, gen)
        for meta_loss in fastmeta.optim.truncated_unrolls(
            lstm, lambda t: loss_fn(t).sum(), theta0, horizon=STEPS, unroll=20
        ):
            meta_opt.zero_grad()
            (meta_loss / args.batch).backward()
            meta_opt.step()
        if it % 25 == 0 or it == args.meta_iterations:
            val = run_learned(lstm, validation)
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in lstm.state_dict().items()}
            print(
                f"meta-iteration {it:4d}: validation loss after {STEPS} steps {val:.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    lstm.load_state_dict(best_state)

    rows = [("LSTM (fastmeta, meta-trained)", "-", run_learned(lstm, test))]
    for name, make in OPTIMIZERS.items():
        tuned = min(LEARNING_RATES, key=lambda lr: run_hand_designed(make(lr), validation))
        rows.append((name, f"{tuned:.3g}", run_hand_designed(make(tuned), test)))
    print(f"\nMean loss after {STEPS} steps on {test[1].shape[0]} held-out quadratics:")
    print(f"{'optimizer':32s} {'tuned lr':>9s} {'loss':>10s}")
    for name, lr, loss in rows:
        print(f"{name:32s} {lr:>9s} {loss:10.4f}")


if __name__ == "__main__":
    main()
