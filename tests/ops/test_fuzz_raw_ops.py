"""Every raw op (``torch.ops.fastmeta.*``, forward and backward) given wrong
shapes, dtypes, devices and sizes raises a Python exception from fastmeta's own
checks, never a signal. The probes run in a subprocess, so that a crash fails
the test (naming the probe) instead of killing the test run.

Each op is described by a valid call: its tensor operands with named
dimensions, and its other arguments. A probe changes one thing:

- a tensor's rank, one of its dimensions (to 0 or one more), its dtype or its
  device (``meta`` among CPU tensors; with a GPU, CPU among CUDA tensors): an
  error is required wherever the changed dimension is tied to another operand
  or to the other arguments;
- a tensor made non-contiguous: the op must run;
- one dimension set to 0 in every operand at once: the op must run or raise;
- an argument that is not a tensor (metric, sizes, constants): an error.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

SIZES = {
    "B": 2,
    "Q": 3,
    "N": 4,
    "D": 5,
    "V": 6,
    "M": 3,
    "S": 5,
    "C": 3,
    "P": 7,
    "L": 2,
    "H": 3,
    "T": 2,
    "I": 2,
    "O": 3,
    "A": 2,
    "Y": 5,
    "Z": 4,
}
HIDDEN = {"I": 2, "O": 3}  # the MLP learner below: widths [I, 4, O]
MLP_PARAMS = 4 * (2 + 1) + 3 * (4 + 1)


def l2o_weights(L, H):
    return sum(4 * H * ((2 if layer == 0 else H) + H + 1) for layer in range(L)) + H + 1


def meta_weights(H):
    return 4 * H * (4 + H + 1) + 2 * (H + 3)


# name: (operands, arguments, dimensions fixed by the arguments). An operand
# is (name, dims, kind): kind "float" (the op's dtype), "acc" (the
# accumulation dtype: float32 here), "index" (int64 values in range) or
# "labels" (each of C classes present). A dimension is a letter of SIZES, a
# digit (a fixed size), "W"/"R" (the flat weights of the two LSTM cells) or "G"/"J" (half of
# "Y"/"Z", rounded up: the pooled maps).
METRIC = ("sqeuclidean",)
X, Y = ("x", "BQD", "float"), ("y", "BND", "float")
SCALE, TARGET = ("scale", "BQ", "float"), ("target", "BQ", "index")
VALUES = ("values", "BNV", "float")
PAIRS = [("x1", "MD", "float"), ("x2", "MD", "float"), ("same", "M", "float")]
L2O = [("grad", "P", "float"), ("state", "L2HP", "float"), ("weights", "W", "float")]
META = [
    ("grad", "P", "float"),
    ("loss", "", "float"),
    ("theta", "P", "float"),
    ("state", "RP", "float"),
    ("weights", "U", "float"),
]
ATTENTION_LSTM = [
    ("query", "BQD", "float"),
    ("support", "BSD", "float"),
    ("weight_ih", "FE", "float"),
    ("weight_hh", "FD", "float"),
]
MAPS = [("queries", "BQYZC", "float"), ("prototypes", "BNYZC", "float")]
MANN_STATE = [
    ("read_weights", "BHS", "float"),
    ("keys", "BTHD", "float"),
    ("write_gates", "BTH", "float"),
    ("key_strengths", "BTH", "float"),
]
GNN_LAYERS = ([torch.randn(3, 5), torch.randn(1, 3)], [torch.randn(3), torch.randn(1)], 0.01)
MLP = [("params", "TK", "float"), ("x", "TNI", "float"), ("target", "TNO", "float"), ("direction", "TK", "float")]
OPS = {
    "pairwise_distance": ([X, Y], METRIC, ""),
    "pairwise_distance_backward": ([("grad", "BQN", "float"), ("distance", "BQN", "float"), X, Y], METRIC, ""),
    "similarity_log_softmax": ([X, Y, SCALE], METRIC, ""),
    "similarity_log_softmax_backward": (
        [("grad", "BQN", "float"), ("log_probs", "BQN", "float"), X, Y, SCALE],
        METRIC,
        "",
    ),
    "similarity_cross_entropy": ([X, Y, TARGET, SCALE], METRIC, ""),
    "similarity_cross_entropy_backward": (
        [("grad", "BQ", "float"), X, Y, TARGET, SCALE, ("logsumexp", "BQ", "acc")],
        METRIC,
        "",
    ),
    "similarity_cross_entropy_with_grad": ([X, Y, TARGET, SCALE], METRIC + (0.5,), ""),
    "attention_readout": ([X, Y, VALUES, SCALE], METRIC, ""),
    "attention_readout_backward": (
        [("grad", "BQV", "float"), ("out", "BQV", "float"), ("logsumexp", "BQ", "acc"), X, Y, VALUES, SCALE],
        METRIC,
        "",
    ),
    "contrastive_loss": (PAIRS, (1.0,), ""),
    "contrastive_loss_backward": ([("grad", "M", "float")] + PAIRS, (1.0,), ""),
    "class_prototypes": ([("support", "BSD", "float"), ("labels", "BS", "labels")], (3,), ""),
    "class_prototypes_backward": ([("grad", "BCD", "float"), ("labels", "BS", "labels")], (), ""),
    "l2o_lstm_step": (L2O, (10.0, 0.1), "W2"),
    "l2o_lstm_step_": ([("param", "P", "float")] + L2O, (10.0, 0.1), "W2"),
    "l2o_lstm_step_backward": (
        [("grad_update", "P", "float"), ("grad_state", "L2HP", "float")] + L2O,
        (10.0, 0.1),
        "W2",
    ),
    "meta_lstm_step": (META, (10.0,), "RU"),
    "meta_lstm_step_backward": ([("grad_theta", "P", "float"), ("grad_state", "RP", "float")] + META, (10.0,), "RU"),
    "matching_attention_lstm": (ATTENTION_LSTM + [("bias", "F", "float")], (2,), "A"),
    "matching_attention_lstm_backward": (
        [("grad", "BQD", "float")]
        + ATTENTION_LSTM
        + [
            ("hiddens", "ABQD", "float"),
            ("cells", "ABQD", "float"),
            ("attention", "ABQS", "float"),
            ("gates", "ABQF", "float"),
        ],
        (),
        "",
    ),
    "relation_pair_pool": (MAPS, (), ""),
    "relation_pair_pool_backward": ([("grad", "BQNGJC", "float")] + MAPS, (), "GJ"),
    "mann_memory": ([("memory", "BSD", "float"), ("usage", "BS", "float")] + MANN_STATE, (0.95,), ""),
    "mann_memory_backward": (
        [
            ("grad_reads", "BTHD", "float"),
            ("grad_memory", "BSD", "float"),
            ("grad_read_weights", "BHS", "float"),
            ("memory", "BSD", "float"),
        ]
        + MANN_STATE
        + [("memories", "BTSD", "float"), ("read_weight_history", "BTHS", "float"), ("least_used", "BTH", "index")],
        (),
        "",
    ),
    "gnn_adjacency": ([("nodes", "BND", "float")], GNN_LAYERS + (False, True), "D"),
    "gnn_adjacency_backward": (
        [("grad", "BNN", "float"), ("adjacency", "BNN", "float"), ("hidden", "X", "float"), ("nodes", "BND", "float")],
        GNN_LAYERS + (False,),
        "D",
    ),
    "mlp_task_derivatives": (MLP, ([2, 4, 3], ["tanh", "identity"], "mse", True), "KIO"),
}
# Invalid non-tensor arguments: (position among the arguments, value).
BAD_ARGUMENTS = {
    "pairwise_distance": [(0, "manhattan"), (0, "dot")],
    "similarity_cross_entropy_with_grad": [(0, "l1")],
    "attention_readout_backward": [(0, "cosine similarity")],
    "class_prototypes": [(0, -1), (0, 2**62), (0, 6)],
    "l2o_lstm_step": [(0, 0.0), (0, -1.0)],
    "meta_lstm_step_backward": [(0, 0.0)],
    "matching_attention_lstm": [(0, -1)],
    "gnn_adjacency": [
        (0, []),
        (2, -1.0),
        (0, [torch.randn(3, 4), torch.randn(1, 3)]),
        (0, [torch.randn(3, 5), torch.randn(2, 3)]),
        (1, [torch.randn(3)]),
    ],
    "mlp_task_derivatives": [
        (0, [2, 4, 4]),
        (0, [2**40, 2**40, 3]),
        (0, [2, 2**62, 3]),
        (0, []),
        (0, [2] * 10 + [3]),
        (1, ["tanh"]),
        (1, ["gelu", "identity"]),
        (2, "hinge"),
    ],
}


def size_of(letter, sizes):
    if letter.isdigit():
        return int(letter)
    return {
        "W": l2o_weights(sizes["L"], sizes["H"]),
        "R": 2 * sizes["H"] + 2,
        "U": meta_weights(sizes["H"]),
        "K": MLP_PARAMS,
        "F": 4 * sizes["D"],
        "E": 2 * sizes["D"],
        "G": (sizes["Y"] + 1) // 2,
        # the GNN's kept hidden activations: every unordered pair's 3 values
        "X": sizes["B"] * (sizes["N"] * (sizes["N"] - 1) // 2) * 3,
        "J": (sizes["Z"] + 1) // 2,
    }.get(letter, sizes.get(letter))


def make(kind, shape, sizes, generator):
    if kind == "index":  # valid classes of the keys
        return torch.randint(0, max(sizes["N"], 1), shape, generator=generator)
    if kind == "labels":  # every class present in every task
        classes = max(sizes["C"], 1)
        return (torch.arange(shape[-1]) % classes).expand(shape).contiguous()
    return torch.randn(shape, generator=generator)


def build(name, sizes=SIZES, change=None):
    """The op's arguments with `change(operand name, tensor) -> tensor` applied."""
    operands, arguments, _ = OPS[name]
    g = torch.Generator().manual_seed(0)
    tensors = []
    for operand, dims, kind in operands:
        t = make(kind, [size_of(d, sizes) for d in dims], sizes, g)
        tensors.append(change(operand, t) if change else t)
    return tensors + list(arguments)


def probes(name):
    """(label, arguments, expectation): "error", "run" or "any" (runs or raises)."""
    operands, arguments, fixed = OPS[name]
    counts = {}
    for _, dims, _ in operands:
        for d in set(dims):
            counts[d] = counts.get(d, 0) + 1
    tied = {d for d, n in counts.items() if n > 1} | set(fixed)
    for operand, dims, kind in operands:

        def on(target, fn):
            return lambda n, t: fn(t) if n == target else t

        yield f"{operand}: one dimension more", build(name, change=on(operand, lambda t: t.unsqueeze(-1))), "error"
        if dims:
            yield f"{operand}: one dimension less", build(name, change=on(operand, lambda t: t[..., 0])), "error"
        wrong = torch.int32 if kind in ("index", "labels") else torch.float64
        layers = any(isinstance(a, list) and a and isinstance(a[0], torch.Tensor) for a in arguments)
        # any floating dtype will do, unless tensors among the arguments fix it
        alone = sum(k in ("float", "acc") for _, _, k in operands) == 1 and not layers
        yield (
            f"{operand}: dtype {wrong}",
            build(name, change=on(operand, lambda t: t.to(wrong))),
            "run" if alone and kind == "float" else "error",
        )
        yield f"{operand}: on the meta device", build(name, change=on(operand, lambda t: t.to("meta"))), "error"
        if torch.cuda.is_available():

            def cpu_among_cuda(n, t, operand=operand):
                return t if n == operand else t.cuda()

            yield f"{operand}: on the CPU, the others on CUDA", build(name, change=cpu_among_cuda), "error"
        if kind in ("float", "acc") and operand == operands[0][0]:
            yield f"{operand}: dtype torch.float16", build(name, change=on(operand, lambda t: t.half())), "error"
        for i, d in enumerate(dims):
            for new in (0, size_of(d, SIZES) + 1):

                def resize(t, i=i, new=new):
                    shape = list(t.shape)
                    shape[i] = new
                    return torch.zeros(shape, dtype=t.dtype)

                yield (
                    f"{operand}: dimension {i} ({d}) = {new}",
                    build(name, change=on(operand, resize)),
                    "error" if d in tied else "any",
                )
        if len(dims) >= 2:

            def strided(t):
                return t.transpose(-1, -2).contiguous().transpose(-1, -2)

            expect = "error" if name == "l2o_lstm_step_" and operand == "state" else "run"
            yield f"{operand}: not contiguous", build(name, change=on(operand, strided)), expect
    for d in sorted(counts):
        if d in SIZES:
            yield f"{d} = 0 everywhere", build(name, sizes={**SIZES, d: 0}), "any"
    for position, value in BAD_ARGUMENTS.get(name, []):
        args = build(name)
        args[len(operands) + position] = value
        yield f"argument {position} = {value!r}", args, "error"
    if name == "l2o_lstm_step":  # a zero-size state may claim any number of layers and units
        args = build(name)
        args[0], args[1] = torch.zeros(0), torch.empty(2**30, 2, 2**30, 0)
        yield "state [2^30, 2, 2^30, 0]", args, "error"


def run_probes():
    """In the subprocess: runs every probe, one JSON line each, flushing
    before each so that a crash names the probe it happened in."""
    import fastmeta  # noqa: F401

    for name in OPS:
        op = getattr(torch.ops.fastmeta, name)
        for label, args, expect in probes(name):
            print(json.dumps({"op": name, "probe": label, "started": True}), flush=True)
            try:
                op(*args)
                result, message = "ran", ""
            except Exception as error:  # noqa: BLE001: every exception is a result here
                result, message = "error", f"{type(error).__name__}: {error}"
            print(
                json.dumps(
                    {
                        "op": name,
                        "probe": label,
                        "expect": expect,
                        "result": result,
                        "message": message.splitlines()[0] if message else "",
                    }
                ),
                flush=True,
            )


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "PYTHONFAULTHANDLER": "0"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        last = lines[-1] if lines else {}
        pytest.fail(
            f"the probe subprocess died with exit status {proc.returncode} in "
            f"{last.get('op')} ({last.get('probe')}):\n{proc.stderr[-2000:]}"
        )
    return [line for line in lines if "result" in line]


@pytest.mark.parametrize("name", list(OPS))
def test_raw_op_rejects_bad_operands_with_a_python_error(results, name):
    mine = [r for r in results if r["op"] == name]
    assert len(mine) >= 10
    wrong = []
    for r in mine:
        if r["expect"] == "error" and r["result"] != "error":
            wrong.append(f"{r['probe']}: ran, an error was expected")
        elif r["expect"] == "run" and r["result"] != "ran":
            wrong.append(f"{r['probe']}: {r['message']}")
        elif r["result"] == "error" and "fastmeta" not in r["message"]:
            wrong.append(f"{r['probe']}: not fastmeta's own check: {r['message']}")
    assert not wrong, "\n".join(wrong)


if __name__ == "__main__":
    run_probes()
