"""The contracts every registered objective keeps (issue 9, item 7).

Parametrised over ``losskit.specs(kind="objective")`` (plus every head
backend of the margin heads); the inputs come from contract_cases.py.

Dtype table (values and input gradients, each low-precision run against a
float64 run of the same module on the *same rounded inputs*, so that only the
arithmetic is measured, not the rounding of the inputs):

==========  =========================================  =====================================
dtype       value: |out - ref| <= tol * (1 + |ref|)    gradient: ||g - g_ref|| <= gtol * (||g_ref|| + 1e-3)
==========  =========================================  =====================================
float32     1e-4                                       1e-3
float16     1e-2                                       3e-2
bfloat16    5e-2                                       1e-1
==========  =========================================  =====================================
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
from torch import Tensor

import losskit
from contract_cases import B, D, ObjectiveCase, Inputs, class_order_permutation, objective_cases, \
    NOT_PERMUTATION_EQUIVARIANT, GRADCHECK_EXEMPT, HOST_SYNC_EXEMPT, MARGIN_HEADS, host_sync_exemption

CASES = objective_cases()
BASE = [c for c in CASES if not c.variant]
WITH_CLASSES = [c for c in CASES if c.task == "embedding"]
HEAD_VARIANTS = [c for c in CASES if c.variant and c.variant.get("head") != "sampled"]

DTYPE_TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 3e-2), torch.bfloat16: (5e-2, 1e-1)}
REDUCTIONS = ("none", "sum", "mean")


def ids(cases):
    return [c.id for c in cases]


def _module(obj, dtype=None):
    if dtype is not None and isinstance(obj, torch.nn.Module):
        obj = obj.to(dtype)
    return obj


def _params(obj) -> dict[str, Tensor]:
    return dict(obj.named_parameters()) if isinstance(obj, torch.nn.Module) else {}


def _backward(out: Tensor) -> None:
    (out.sum() if out.dim() else out).backward()


def _input_grads(inp: Inputs) -> dict[str, Tensor | None]:
    return {n: inp.tensors[n].grad for n in inp.float_names}


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def _assert_close(a, b, what, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- reduction

@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_none_sum_mean_agree(case: ObjectiveCase, device):
    """'none' is [B] aligned with the rows (unscored rows 0), 'sum' its sum,
    'mean' its sum over the documented denominator; sample weights multiply
    rows and do not change the denominator."""
    base = case.inputs(dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(3)
    w = (torch.rand(B, generator=g, dtype=torch.float64) * 2).to(device)
    w[0] = 0.0
    out = {}
    for weighted in (False, True):
        for r in REDUCTIONS:
            obj = _module(case.build(r, device=device), torch.float64)
            out[r, weighted] = base.leaves().call(obj, w if weighted else None)
    none = out["none", False]
    assert none.shape == (B,), f"reduction='none' must return [B] = [{B}], got {list(none.shape)}"
    assert _finite(none)
    scored = case.scored(base)
    if not bool(scored.all()):
        assert torch.equal(none.detach()[~scored], torch.zeros_like(none.detach()[~scored])), \
            "rows that are not scored must hold 0 with reduction='none'"
    n = case.denominator(base)
    _assert_close(out["sum", False], none.sum(), "sum == none.sum()")
    _assert_close(out["mean", False], none.sum() / n, f"mean == none.sum() / {n:g} (documented denominator)")
    _assert_close(out["none", True], w * none, "none with sample_weight == w * none")
    _assert_close(out["sum", True], (w * none).sum(), "sum with sample_weight == sum(w * none)")
    _assert_close(out["mean", True], (w * none).sum() / n, f"mean with sample_weight == sum(w * none) / {n:g}")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_none_rows_follow_the_input_rows(case: ObjectiveCase, device):
    """Permuting the rows (keeping each class's order) permutes 'none'."""
    if case.name in NOT_PERMUTATION_EQUIVARIANT:
        pytest.skip(f"documented: {NOT_PERMUTATION_EQUIVARIANT[case.name]}")
    base = case.inputs(dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(5)
    if base.labels is not None:
        perm = class_order_permutation(base.labels.cpu(), g)
    else:
        perm = torch.randperm(B, generator=g)
    perm = perm.to(device)
    obj = _module(case.build("none", device=device), torch.float64)
    a = base.call(obj)
    obj = _module(case.build("none", device=device), torch.float64)
    b = base.permute(perm).call(obj)
    _assert_close(b, a[perm], "none(x[perm]) == none(x)[perm]")


def test_bad_reduction_is_refused():
    for case in BASE:
        if "reduction" not in case.spec.hparams:
            continue
        with pytest.raises(ValueError, match="reduction"):
            case.build("avg")


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_zero_sample_weight_gives_zero_gradient(case: ObjectiveCase, device):
    for r in REDUCTIONS:
        obj = case.build(r, device=device)
        inp = case.inputs(device=device).leaves()
        out = inp.call(obj, torch.zeros(B, device=device))
        assert _finite(out) and bool((out.detach() == 0).all()), f"{r}: all-zero weights must give 0, got {out}"
        _backward(out)
        for n, gr in {**_input_grads(inp), **{k: p.grad for k, p in _params(obj).items()}}.items():
            assert gr is None or bool((gr == 0).all()), f"{r}: gradient of {n} must be 0 with all-zero weights"
    if not case.row_independent:
        return
    # rows that do not interact: a zero weight on one row zeroes that row's gradient only
    obj = case.build("mean", device=device)
    inp = case.inputs(device=device).leaves()
    w = torch.ones(B, device=device)
    w[1] = 0.0
    _backward(inp.call(obj, w))
    for n, gr in _input_grads(inp).items():
        assert gr is not None, f"{n}: no gradient"
        assert bool((gr[1] == 0).all()), f"{n}[1]: weight 0 must give a zero gradient, got {gr[1]}"
        assert bool((gr != 0).any()), f"{n}: the other rows must have a gradient"


# ----------------------------------------------------------------------------- degenerate batches

@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_empty_batch_is_a_finite_zero_connected_to_the_graph(case: ObjectiveCase, device):
    for r in REDUCTIONS:
        obj = case.build(r, device=device)
        inp = case.inputs(0, device=device).leaves()
        out = inp.call(obj)
        if r == "none":
            assert out.shape == (0,), f"none: expected shape [0], got {list(out.shape)}"
        else:
            assert out.shape == (), f"{r}: expected a scalar, got {list(out.shape)}"
            assert _finite(out) and float(out) == 0.0, f"{r}: expected 0, got {out}"
            assert out.requires_grad, f"{r}: the zero must be connected to the graph (DDP, backward())"
        _backward(out)
        for n, gr in _input_grads(inp).items():
            assert gr is not None and gr.shape == inp.tensors[n].shape, f"{r}: {n} got no gradient"
        if r != "none":
            for n, p in _params(obj).items():
                assert p.grad is not None, f"{r}: parameter {n} is not connected to the empty-batch zero"
                assert bool((p.grad == 0).all())


@pytest.mark.parametrize("case", WITH_CLASSES, ids=ids(WITH_CLASSES))
def test_one_class_batch_is_finite(case: ObjectiveCase, device):
    for r in REDUCTIONS:
        obj = case.build(r, device=device)
        inp = case.inputs(device=device, one_class=True).leaves()
        out = inp.call(obj)
        assert out.shape == ((B,) if r == "none" else ()), f"{r}: shape {list(out.shape)}"
        assert _finite(out), f"{r}: one-class batch gave {out}"
        _backward(out)
        for n, gr in _input_grads(inp).items():
            assert gr is None or _finite(gr), f"{r}: gradient of {n} is not finite"


# ----------------------------------------------------------------------------- non-finite input

@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_non_finite_input_is_a_clear_error(case: ObjectiveCase, bad, device):
    base = case.inputs(device=device)
    problems = []
    for name in base.float_names + base.extra_float:
        t = base.tensors[name].clone()
        t.view(-1)[min(1, t.numel() - 1)] = bad
        obj = case.build("mean", device=device)
        _must_refuse(problems, f"{name}={bad}", name, lambda: base.replace(**{name: t}).call(obj))
    assert not problems, "\n".join(problems)


def _must_refuse(problems: list, what: str, name: str, call, errors: tuple = (ValueError,)) -> None:
    """``call()`` must raise one of ``errors`` whose message names ``name``; else note the problem."""
    try:
        out = call()
    except errors as e:
        if name not in str(e):
            problems.append(f"{what}: the {type(e).__name__} does not name {name!r}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        problems.append(f"{what}: {type(e).__name__} instead of {errors[0].__name__}: {e}")
        return
    shown = out.detach().cpu().tolist() if isinstance(out, torch.Tensor) else type(out).__name__
    problems.append(f"{what}: accepted silently ({shown})")


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_dtype_table(case: ObjectiveCase, dtype, device):
    tol, gtol = DTYPE_TOL[dtype]
    low_in = case.inputs(dtype=dtype, device=device)
    for r in ("mean", "none"):
        obj = case.build(r, device=device)
        ref_obj = _module(copy.deepcopy(obj), torch.float64)
        low = low_in.leaves()
        ref = low_in.to(torch.float64).leaves()
        out = low.call(obj)
        want = ref.call(ref_obj)
        assert out.is_floating_point() and _finite(out), f"{r}: {dtype} gave {out}"
        err = (out.detach().double() - want.detach()).abs()
        bound = tol * (1 + want.detach().abs())
        assert bool((err <= bound).all()), \
            f"{r}: {dtype} differs from float64 by {err.max().item():.3g} (allowed {tol} * (1 + |ref|))"
        _backward(out)
        _backward(want)
        for n in low.float_names:
            g, gr = low.tensors[n].grad, ref.tensors[n].grad
            assert (g is None) == (gr is None), f"{r}: gradient of {n} missing in one dtype"
            if g is None:
                continue
            assert g.dtype == dtype and _finite(g), f"{r}: gradient of {n} in {dtype} is not finite"
            gerr = (g.double() - gr).norm().item()
            assert gerr <= gtol * (gr.norm().item() + 1e-3), \
                f"{r}: {dtype} gradient of {n} differs from float64 by {gerr:.3g} (norm {gr.norm().item():.3g})"


# ----------------------------------------------------------------------------- shapes

ODD_SHAPES = [(1, D), (3, D), (B, 1), (B, 7)]
ODD = [(c, b, d) for c in CASES for (b, d) in ODD_SHAPES if c.task == "embedding" or d == D]


@pytest.mark.parametrize("case,b,d", ODD, ids=[f"{c.id}-B{b}-D{d}" for c, b, d in ODD])
def test_odd_shapes(case: ObjectiveCase, b, d, device):
    for r in REDUCTIONS:
        obj = case.build(r, d=d, device=device)
        inp = case.inputs(b, d=d, device=device).leaves()
        out = inp.call(obj)
        assert out.shape == ((b,) if r == "none" else ()), f"{r}: B={b} D={d}: shape {list(out.shape)}"
        assert _finite(out), f"{r}: B={b} D={d}: {out}"
        _backward(out)
        for n, gr in _input_grads(inp).items():
            assert gr is None or (gr.shape == inp.tensors[n].shape and _finite(gr)), f"{r}: gradient of {n}"


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_non_contiguous_input_gives_the_same_result(case: ObjectiveCase, device):
    nc = case.inputs(device=device, noncontiguous=True, dtype=torch.float64)
    assert not nc.tensors[nc.float_names[0]].is_contiguous()
    c = nc.replace(**{n: nc.tensors[n].contiguous() for n in nc.float_names})
    for r in ("mean", "none"):
        a_in, b_in = nc.leaves(), c.leaves()
        a = a_in.call(_module(case.build(r, device=device), torch.float64))
        b = b_in.call(_module(case.build(r, device=device), torch.float64))
        _assert_close(a, b, f"{r}: non-contiguous vs contiguous")
        _backward(a)
        _backward(b)
        for n in nc.float_names:
            if a_in.tensors[n].grad is not None:
                _assert_close(a_in.tensors[n].grad, b_in.tensors[n].grad, f"{r}: gradient of {n}")


# ----------------------------------------------------------------------------- state

def _state_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("case", BASE, ids=ids(BASE))
def test_state_dict_round_trip(case: ObjectiveCase, device):
    """Build, run two training steps, save, load into a fresh object (other
    seed): the same outputs, in training mode (state updated on both) and eval."""
    a = case.build("mean", device=device, seed=0)
    if not isinstance(a, torch.nn.Module):
        pytest.skip("not an nn.Module (no state_dict)")
    a.train()
    for step in range(2):
        a_in = case.inputs(device=device, seed=10 + step).leaves()
        _backward(a_in.call(a, seed=step))
    state = _state_round_trip(a)
    b = case.build("mean", device=device, seed=1)
    b.load_state_dict(state)
    for mode in ("train", "eval", "train"):
        a.train(mode == "train")
        b.train(mode == "train")
        inp = case.inputs(device=device, seed=20)
        _assert_close(inp.call(b, seed=7), inp.call(a, seed=7), f"{mode}: loaded object vs original")


def _stray_tensors(obj, b: int) -> list[str]:
    """Tensors an object keeps outside its parameters/buffers that are
    batch-sized or carry a graph."""
    found, seen = [], set()

    def look(t: Tensor, path: str):
        if b in t.shape or t.grad_fn is not None:
            found.append(f"{path}: {list(t.shape)}{' with grad_fn' if t.grad_fn is not None else ''}")

    def walk(o, path: str, depth: int):
        if id(o) in seen or depth > 4:
            return
        seen.add(id(o))
        if isinstance(o, Tensor):
            look(o, path)
        elif isinstance(o, torch.nn.Module):
            for k, v in vars(o).items():
                if k in ("_parameters", "_buffers", "_modules") or k.startswith("_forward") or \
                        k.startswith("_backward") or k.startswith("_state_dict") or k.startswith("_load"):
                    continue
                walk(v, f"{path}.{k}", depth + 1)
            for k, m in o._modules.items():
                walk(m, f"{path}.{k}", depth + 1)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}[{k!r}]", depth + 1)
        elif isinstance(o, (list, tuple, set)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]", depth + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, type) and type(o).__module__.startswith("losskit"):
            for k, v in vars(o).items():
                walk(v, f"{path}.{k}", depth + 1)

    walk(obj, type(obj).__name__, 0)
    return found


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_keeps_no_batch_tensors_between_calls(case: ObjectiveCase, device):
    """Per-batch values (drawn margins, batch statistics, graphs) do not stay
    on the object after a call."""
    b = 11  # a size no hyperparameter has
    obj = case.build("mean", device=device)
    inp = case.inputs(b, device=device).leaves()
    _backward(inp.call(obj))
    assert not _stray_tensors(obj, b), "the object keeps per-batch tensors: " + "; ".join(_stray_tensors(obj, b))


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_float64_gradcheck(case: ObjectiveCase, device):
    if case.name in GRADCHECK_EXEMPT:
        pytest.skip(f"documented: {GRADCHECK_EXEMPT[case.name]}")
    b, d = 6, 3
    obj = _module(case.build("mean", d=d, device=device), torch.float64)
    obj.eval() if isinstance(obj, torch.nn.Module) else None  # no state updates between evaluations
    inp = case.inputs(b, d=d, dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(b, generator=g, dtype=torch.float64) + 0.5).to(device)
    names = inp.float_names
    params = {k: p.detach().clone().requires_grad_(True) for k, p in _params(obj).items()}

    def fn(*xs):
        ins = inp.replace(**dict(zip(names, xs[:len(names)])))
        ps = dict(zip(params, xs[len(names):]))
        torch.manual_seed(0)
        args = [ins.tensors[n] for n in ins.positional]
        kw = {n: t for n, t in ins.tensors.items() if n not in ins.positional}
        return torch.func.functional_call(obj, ps, tuple(args), {**kw, "sample_weight": w})

    xs = [inp.tensors[n].detach().clone().requires_grad_(True) for n in names] + list(params.values())
    assert torch.autograd.gradcheck(fn, tuple(xs), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


@pytest.mark.parametrize("case", HEAD_VARIANTS, ids=ids(HEAD_VARIANTS))
def test_head_backends_give_the_dense_numbers(case: ObjectiveCase, device):
    dense = dict(case.variant, head="dense")
    dense.pop("chunk_size", None)
    for r in REDUCTIONS:
        a_in = case.inputs(dtype=torch.float64, device=device).leaves()
        b_in = case.inputs(dtype=torch.float64, device=device).leaves()
        a_obj = _module(case.build(r, device=device), torch.float64)
        b_obj = _module(case.build(r, device=device, **dense), torch.float64)
        a, b = a_in.call(a_obj), b_in.call(b_obj)
        _assert_close(a, b, f"{r}: {case.variant['head']} vs dense", rtol=1e-6, atol=1e-8)
        _backward(a)
        _backward(b)
        _assert_close(a_in.tensors["embeddings"].grad, b_in.tensors["embeddings"].grad, f"{r}: grad embeddings",
                      rtol=1e-6, atol=1e-8)
        _assert_close(a_obj.weight.grad, b_obj.weight.grad, f"{r}: grad weight", rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- host sync, hyperparameters

@contextlib.contextmanager
def _host_sync_raises():
    # nonzero/unique/masked indexing return data-dependent shapes: the count is read on the host
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_fn = torch.nonzero

    def boom(self, *a, **k):
        raise AssertionError("host synchronisation with tensor checks off")

    for n in names:
        setattr(torch.Tensor, n, boom)
    torch.nonzero = boom
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.nonzero = saved_fn


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_forward_makes_no_host_sync_with_checks_off(case: ObjectiveCase, device):
    """``with losskit.tensor_checks(False)`` a forward and its backward never read a
    tensor on the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
    ``nonzero``), so that
    ``torch.compile(fullgraph=True)`` can trace it.  Exempt by design: the
    table HOST_SYNC_EXEMPT of contract_cases.py."""
    why = host_sync_exemption(case)
    if why is not None:
        pytest.skip(f"documented: {why}")
    obj = case.build("mean", device=device)
    inp = case.inputs(device=device).leaves()
    w = torch.ones(B, device=device)
    try:
        with losskit.tensor_checks(False), _host_sync_raises():
            out = inp.call(obj, w)
            if out.requires_grad:
                out.backward()
    except AssertionError as e:
        import traceback
        tb = [f for f in traceback.extract_tb(e.__traceback__) if "losskit" in f.filename]
        where = f"{tb[-1].filename.split('src/')[-1]}:{tb[-1].lineno} `{tb[-1].line}`" if tb else "?"
        pytest.fail(f"host synchronisation at {where}", pytrace=False)


def test_host_sync_exemptions_name_real_entries_and_heads():
    names = {s.name for s in losskit.specs(kind="objective")}
    for key in HOST_SYNC_EXEMPT:
        if key.startswith("head="):
            assert key[5:] in MARGIN_HEADS, f"HOST_SYNC_EXEMPT: unknown head {key!r}"
        else:
            assert key in names, f"HOST_SYNC_EXEMPT: {key!r} is not a registered objective"


@pytest.mark.parametrize("case", BASE, ids=ids(BASE))
def test_hyperparameters_are_captured_and_nan_is_refused(case: ObjectiveCase):
    obj = case.build("mean")
    hp = getattr(obj, "hparams", None)
    assert isinstance(hp, dict), "registered objects carry self.hparams"
    assert set(hp) == set(case.spec.hparams) | set(case.spec.required)
    for k, v in case.hparams().items():
        assert hp[k] == v, f"hparams[{k!r}] = {hp[k]!r}, built with {v!r}"
    problems = []
    for k, v in case.spec.hparams.items():
        if type(v) is not float or not math.isfinite(v) or k in case.variant:
            continue
        _must_refuse(problems, f"{k}=nan", k, lambda k=k: case.build("mean", **{k: math.nan}),
                     errors=(ValueError, TypeError))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", BASE, ids=ids(BASE))
def test_invalid_hyperparameters_are_refused(case: ObjectiveCase):
    from contract_cases import INVALID_HPARAMS

    problems = []
    for k, values in INVALID_HPARAMS.get(case.name, {}).items():
        for v in values:
            _must_refuse(problems, f"{k}={v}", k, lambda k=k, v=v: case.build("mean", **{k: v}))
    assert not problems, "\n".join(problems)


PREF = [c for c in BASE if c.task == "preference"]


@pytest.mark.parametrize("given", ["chosen_lengths", "rejected_lengths"])
@pytest.mark.parametrize("case", PREF, ids=ids(PREF))
def test_one_length_tensor_alone_is_refused(case: ObjectiveCase, given, device):
    """Length normalisation needs both token counts; one alone is an error,
    never a silently skipped normalisation."""
    inp = case.inputs(device=device)
    lengths = torch.full((B,), 3.0, device=device)
    obj = case.build("mean", device=device)
    with pytest.raises(ValueError, match="chosen_lengths|rejected_lengths"):
        inp.replace(**{given: lengths}).call(obj)
