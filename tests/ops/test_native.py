"""The C decode kernels (hybridlm.ops.native) against their plain twins, on shapes with tails."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops import native
from hybridlm.ops.gated_deltanet import gated_deltanet_reference, gated_deltanet_step
from hybridlm.ops.moe import moe_experts_few_tokens, moe_experts_reference, route
from hybridlm.ops.ssd import ssd_reference, ssd_step
from tests.helpers import assert_close, torch_threads

requires_kernels = pytest.mark.skipif(
    not native.available(), reason="kernels unavailable (no C compiler, or HYBRIDLM_NATIVE=0): the twins run instead"
)


def test_kernels_build_where_a_compiler_exists():
    """A machine with a C compiler must get the kernels, not a silent fallback to the slower twins."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    if os.environ.get("HYBRIDLM_NATIVE") == "0":
        pytest.skip("HYBRIDLM_NATIVE=0 turns the kernels off")
    assert native.available()


@requires_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 17, 64])
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 1), (33, 17), (100, 512), (7, 1000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(rows, out_features, in_features, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    assert_close(native.linear(x, weight, bias), F.linear(x, weight, bias))


def test_linear_falls_back_for_many_rows_autograd_and_other_dtypes():
    weight = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(native.MAX_ROWS + 1, 5)
    assert_close(native.linear(x, weight), F.linear(x, weight))
    y = native.linear(torch.randn(2, 5), weight)
    assert y.requires_grad  # autograd took F.linear: gradients flow
    x64 = torch.randn(2, 5, dtype=torch.float64)
    assert native.linear(x64, weight.detach().double()).dtype == torch.float64


@requires_kernels
@pytest.mark.parametrize("rows", [1, 5, 16, 200])
def test_expert_linear_matches_per_expert_loop(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(7, 48, generator=g)
    weight = torch.randn(9, 40, 48, generator=g)
    input_row = torch.randint(0, 7, (rows,), generator=g)
    expert = torch.randint(0, 9, (rows,), generator=g)
    expected = native.expert_linear_reference(x, input_row, expert, weight)
    assert_close(native.expert_linear(x, input_row, expert, weight), expected)


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_moe_few_tokens_matches_reference(activation, tokens):
    g = torch.Generator().manual_seed(tokens)
    E, D, I, K = 8, 32, 24, 2
    hidden = torch.randn(tokens, D, generator=g)
    ids, weights, _ = route(torch.randn(tokens, E, generator=g), K)
    up = torch.randn(E, 2 * I if activation == "swiglu" else I, D, generator=g) * 0.2
    down = torch.randn(E, D, I, generator=g) * 0.2
    expected = moe_experts_reference(hidden, ids, weights, up, down, activation)
    assert_close(moe_experts_few_tokens(hidden, ids, weights, up, down, activation), expected)


def _gated_deltanet_projections(batch, T, H, Hk, K, V, seed):
    """Raw projections as the mixer hands them to the kernel: qkv after the conv (strided rows), b, a."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch * T, 2 * Hk * K + H * V + 5, generator=g)[:, 5:]
    b = torch.randn(batch * T, H + 1, generator=g)[:, 1:]
    a = 3 * torch.randn(batch * T, H, generator=g)
    A_log, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    state = torch.randn(batch, H, K, V, generator=g)
    return qkv, b, a, A_log, dt_bias, state


def _gated_deltanet_inputs_float64(qkv, b, a, A_log, dt_bias, batch, T, H, Hk, K, V):
    """The mixer's formulas written out in float64: L2-normalised q, k (repeated to H heads), v, g, beta."""
    q, k, v = qkv.double().view(batch, T, -1).split([Hk * K, Hk * K, H * V], dim=-1)
    q, k = ((t.reshape(batch, T, Hk, K) / (t.reshape(batch, T, Hk, K).square().sum(-1, keepdim=True) + 1e-6).sqrt())
            .repeat_interleave(H // Hk, dim=2) for t in (q, k))  # fmt: skip
    beta = torch.sigmoid(b.double()).view(batch, T, H)
    log_decay = -torch.exp(A_log.double()) * F.softplus(a.double() + dt_bias.double()).view(batch, T, H)
    return q, k, v.reshape(batch, T, H, V), log_decay, beta


@requires_kernels
@pytest.mark.parametrize(("batch", "H", "Hk", "K", "V"), [(1, 8, 8, 64, 64), (3, 4, 2, 16, 12), (2, 4, 2, 32, 128)])
def test_gated_delta_scan_of_one_token_matches_gated_deltanet_step(batch, H, Hk, K, V):
    qkv, b, a, A_log, dt_bias, state = _gated_deltanet_projections(batch, 1, H, Hk, K, V, seed=K)
    q, k, v, log_decay, beta = _gated_deltanet_inputs_float64(qkv, b, a, A_log, dt_bias, batch, 1, H, Hk, K, V)
    o_expected, state_expected = gated_deltanet_step(
        q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], beta[:, 0], state.double()
    )
    o = native.gated_delta_scan_(qkv, b, a, A_log, dt_bias, Hk, state)
    assert_close(o.view(batch, H, V), o_expected.float(), name="o")
    assert_close(state, state_expected.float(), name="state")


@requires_kernels
@pytest.mark.parametrize(
    ("batch", "T", "H", "Hk", "K", "V"),
    [(1, 300, 8, 8, 64, 64), (3, 17, 4, 2, 16, 12), (2, 2, 4, 2, 32, 128), (1, 5, 2, 1, 128, 128)],
)
def test_gated_delta_scan_matches_the_reference_loop(batch, T, H, Hk, K, V):
    """Prefill token by token against the plain loop in float64, from a carried state; strong decays included."""
    qkv, b, a, A_log, dt_bias, state = _gated_deltanet_projections(batch, T, H, Hk, K, V, seed=T)
    inputs = _gated_deltanet_inputs_float64(qkv, b, a, A_log, dt_bias, batch, T, H, Hk, K, V)
    o_expected, state_expected = gated_deltanet_reference(*inputs, state.double())
    o = native.gated_delta_scan_(qkv, b, a, A_log, dt_bias, Hk, state)
    assert_close(o.view(batch, T, H, V), o_expected.float(), name="o")
    assert_close(state, state_expected.float(), name="state")


def test_build_goes_to_the_cache_dir_and_is_reused(tmp_path, monkeypatch):
    """The library is written under HYBRIDLM_CACHE_DIR (staged, then renamed) and loaded from there."""
    if not native.available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("HYBRIDLM_CACHE_DIR", str(tmp_path))
    (tmp_path / "native").mkdir()
    killed = tmp_path / "native" / ".native-0123.so.abcd.tmp"  # what a build killed mid-way leaves
    killed.write_bytes(b"half a library")
    os.utime(killed, (0, 0))
    native._library.cache_clear()
    try:
        assert native.available()
        built = list((tmp_path / "native").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so", built  # no staging file left behind, old or new
        assert native._library()._name == str(built[0])  # the library loaded is the one built there
        x, weight = torch.randn(3, 8), torch.randn(5, 8)
        assert_close(native.linear(x, weight), F.linear(x, weight))
    finally:
        native._library.cache_clear()


def _rms_norm_truth(x, weight, eps, group, add_one, gate, gate_first):
    x64, w64 = x.double(), weight.double()
    silu = None if gate is None else torch.nn.functional.silu(gate.double())
    if silu is not None and gate_first:
        x64 = x64 * silu
    grouped = x64.unflatten(-1, (-1, group))
    normed = (grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    y = normed * (1 + w64 if add_one else w64)
    if silu is not None and not gate_first:
        y = y * silu
    return y


@requires_kernels
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize(("dim", "group"), [(48, 48), (48, 16), (7, 7)])
@pytest.mark.parametrize("add_one", [False, True])
@pytest.mark.parametrize("gated", [None, "gate first", "gate after"])
def test_rms_norm_matches_float64_formula(rows, dim, group, add_one, gated):
    g = torch.Generator().manual_seed(rows + dim)
    x = torch.randn(rows, dim, generator=g)
    weight = torch.randn(dim, generator=g)
    gate = torch.randn(rows, dim, generator=g) if gated else None
    assert native.rms_norm_applies(x, weight)
    y = native.rms_norm(x, weight, 1e-5, group, add_one, gate, gated == "gate first")
    assert_close(y, _rms_norm_truth(x, weight, 1e-5, group, add_one, gate, gated == "gate first").float())


@requires_kernels
@pytest.mark.parametrize("rows", [1, 5])
def test_l2_normalize_matches_float64_formula(rows):
    x = torch.randn(rows, 3, 24)[:, :, :20]  # a strided view, as a split of a projection gives
    x64 = x.double()
    assert_close(native.l2_normalize(x, 1e-6), (x64 / torch.sqrt(x64.pow(2).sum(-1, keepdim=True) + 1e-6)).float())


@requires_kernels
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    ("tokens", "shared"),
    [(t, s) for t in (1, 3, 8, 300) for s in ("none", "plain", "gated")] + [(300, "weights"), (300, "gated weights")],
)
def test_moe_block_matches_route_then_reference(activation, scoring, tokens, with_bias, shared):
    """Decode kernel (<= 256 (token, expert) pairs) and prefill kernel (300 tokens: tiles on 2 threads, one expert
    without tokens) against route + the reference loop, plus the shared expert's output as the MoE layer adds it:
    given, or ("weights", prefill only) computed by the kernel from the shared expert's weights."""
    g = torch.Generator().manual_seed(tokens * 7 + with_bias)
    E, D, I, K = 8, 32, 24, 2
    hidden = torch.randn(tokens, D, generator=g)
    logits = torch.randn(tokens, E, generator=g) * 3  # clear margins: no near-ties for top-k to break
    logits[:, 5] = -30.0  # expert 5 gets no token
    bias = torch.randn(E, generator=g) * 0.1 if with_bias else None
    up = torch.randn(E, 2 * I if activation == "swiglu" else I, D, generator=g) * 0.2
    down = torch.randn(E, D, I, generator=g) * 0.2
    S = 40  # the shared expert's width
    shared_weights = [torch.randn(S, D, generator=g) * 0.2 for _ in range(2 if activation == "swiglu" else 1)]
    shared_weights.append(torch.randn(D, S, generator=g) * 0.2)
    if "weights" in shared:  # the truth: hybridlm.layers.mlp's torch formula
        hidden_S = F.linear(hidden, shared_weights[0])
        if activation == "swiglu":
            hidden_S = F.silu(hidden_S) * F.linear(hidden, shared_weights[1])
        else:
            hidden_S = torch.relu(hidden_S).square()
        shared_out = F.linear(hidden_S, shared_weights[-1])
    else:
        shared_out = None if shared == "none" else torch.randn(tokens, D, generator=g)
    gate_columns = torch.randn(tokens, 3, generator=g)  # the gate's logit is a column of a wider projection
    gate = gate_columns[:, 1:2] if shared.startswith("gated") else None
    ids, weights, _ = route(
        logits, K, scoring=scoring, expert_bias_E=bias, norm_topk_prob=True, routed_scaling_factor=2.5
    )
    expected = moe_experts_reference(hidden, ids, weights, up, down, activation)
    if shared_out is not None:
        expected = expected + (shared_out if gate is None else torch.sigmoid(gate) * shared_out)
    decodes = native.moe_decode_applies(hidden, K, up, down, num_groups=1)
    assert decodes == (tokens * K <= native.MAX_EXPERT_ROWS)
    assert decodes or native.moe_prefill_applies(hidden, K, up, down, num_groups=1) == native.blas_available()
    if not (decodes or native.blas_available()):
        return
    given, projections = (None, shared_weights) if "weights" in shared else (shared_out, ())
    assert decodes or native.moe_prefill_applies(hidden, K, up, down, 1, projections)
    with torch_threads(2):
        result = native.moe_block(
            hidden, logits, K, scoring, bias, True, 2.5, up, down, activation, given, gate, projections
        )
    assert result is not None
    out, got_ids, got_weights, counts = result
    assert torch.equal(got_ids.sort(-1).values, ids.sort(-1).values)
    assert_close(got_weights.gather(1, got_ids.argsort(-1)), weights.gather(1, ids.argsort(-1)), name="weights")
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=E))
    assert counts[5] == 0
    assert_close(out, expected, name="out")


@requires_kernels
@pytest.mark.parametrize("tokens", [3, 300])
def test_moe_block_keeps_a_nan_logit_in_its_token(tokens):
    """A NaN router logit (a NaN in that token's hidden state) makes that token's output NaN, as torch's route
    does (topk ranks NaN first); the kernel's expert ids stay in range (a NaN used to leave none chosen and
    corrupt memory) and the other tokens' outputs match route + the reference loop."""
    g = torch.Generator().manual_seed(tokens)
    E, D, I, K = 8, 32, 24, 2
    hidden, logits = torch.randn(tokens, D, generator=g), torch.randn(tokens, E, generator=g) * 3
    logits[1] = float("nan")
    logits[2, 3] = float("nan")
    up, down = torch.randn(E, 2 * I, D, generator=g) * 0.2, torch.randn(E, D, I, generator=g) * 0.2
    ids, weights, _ = route(logits, K)
    expected = moe_experts_reference(hidden, ids, weights, up, down, "swiglu")
    with torch_threads(2):
        out, got_ids, _, counts = native.moe_block(hidden, logits, K, "softmax", None, True, 1.0, up, down, "swiglu")
    assert int(got_ids.min()) >= 0 and int(got_ids.max()) < E and int(counts.sum()) == tokens * K
    assert out[1].isnan().all() and out[2].isnan().all() and expected[2].isnan().all()
    finite = [t for t in range(tokens) if t not in (1, 2)]
    assert_close(out[finite], expected[finite], name="out")
    with pytest.raises(ValueError, match="top_k must be in"):
        native.moe_block(hidden, logits, E + 1, "softmax", None, True, 1.0, up, down, "swiglu")


@requires_kernels
@pytest.mark.parametrize(
    ("shared", "message"),
    [
        ({"shared_ND": torch.zeros(300, 31)}, r"shared_ND must be \[300, 32\]"),
        ({"shared_ND": torch.zeros(300, 32), "shared_gate_N1": torch.zeros(299, 1)}, r"must be \[300, 1\]"),
        ({"shared_ND": torch.zeros(300, 32), "shared_gate_N1": torch.zeros(1, 300)}, r"got \[1, 300\]"),
        ({"shared_projections": (torch.zeros(40, 32), torch.zeros(32, 40))}, "for swiglu must be shaped"),
    ],
)
def test_moe_block_refuses_misshaped_shared_tensors(shared, message):
    """The kernel would read past a shared-expert tensor of the wrong shape: one ValueError naming it."""
    hidden, logits = torch.randn(300, 32), torch.randn(300, 8)
    up, down = torch.randn(8, 48, 32), torch.randn(8, 32, 24)
    with pytest.raises(ValueError, match=message):
        native.moe_block(hidden, logits, 2, "softmax", None, True, 1.0, up, down, "swiglu", **shared)


@requires_kernels
@pytest.mark.parametrize("rows", [1, 4, 9, 65, 300, 513])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_many_matches_concatenated_f_linear(rows, with_bias):
    """Up to 64 rows the decode kernel; above, 256 x 256 tiles of MKL sgemm on the pool (here partial row and
    column tiles, a one-column weight, a weight wider than a tile)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 40, generator=g)
    weights = [torch.randn(n, 40, generator=g) for n in (7, 300, 1, 16)]
    biases = [torch.randn(w.shape[0], generator=g) if with_bias and i != 1 else None for i, w in enumerate(weights)]
    expected = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
    assert native.fuses_projections(x, weights, biases) == (rows <= native.MAX_ROWS or native.blas_available())
    with torch_threads(2):
        assert_close(native.linear_many(x, weights, biases), expected)


@requires_kernels
def test_projections_fall_back_to_one_linear_each_under_autograd():
    from hybridlm.layers.linear import Linear, project

    g = torch.Generator().manual_seed(0)
    projections = [Linear(40, n) for n in (8, 300)]
    x = torch.randn(300, 40, generator=g, requires_grad=True)
    assert not native.fuses_projections(x, [p.weight for p in projections], [p.bias for p in projections])
    outputs = project(x, projections)
    sum(o.square().sum() for o in outputs).backward()
    expected = torch.autograd.grad(sum(F.linear(x, p.weight, p.bias).square().sum() for p in projections), x)[0]
    assert_close(x.grad, expected)


@requires_kernels
@pytest.mark.parametrize("kernel_width", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_conv_of_one_token_rolls_the_state_like_causal_conv1d_step(kernel_width, with_bias):
    from hybridlm.ops.conv import causal_conv1d_step

    g = torch.Generator().manual_seed(kernel_width)
    wide = torch.randn(3, 50, generator=g)
    x = wide[:, 5:42]  # a column slice of a wider projection, as the mixers pass it
    state = torch.randn(3, 37, kernel_width - 1, generator=g)
    weight = torch.randn(37, kernel_width, generator=g)
    bias = torch.randn(37, generator=g) if with_bias else None
    y_expected, state_expected = causal_conv1d_step(x, state, weight, bias, "silu")
    assert_close(native.causal_conv_(x, state, weight, bias, "silu"), y_expected, name="y")
    assert_close(state, state_expected, name="state")


@requires_kernels
@pytest.mark.parametrize("kernel_width", [1, 2, 4])
@pytest.mark.parametrize(("batch", "T"), [(1, 300), (3, 2), (2, 17)])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv_over_a_prompt_matches_the_tap_loop(kernel_width, batch, T, activation):
    """Prompts shorter than the state (T = 2 < K - 1 = 3) included: the new state then reaches into the old."""
    from hybridlm.ops.conv import causal_conv1d_reference

    g = torch.Generator().manual_seed(T * kernel_width)
    x = torch.randn(batch * T, 70, generator=g)[:, 5:42] * 6  # strided rows; large inputs reach silu's tails
    state = torch.randn(batch, 37, kernel_width - 1, generator=g)
    weight, bias = torch.randn(37, kernel_width, generator=g), torch.randn(37, generator=g)
    y_expected, state_expected = causal_conv1d_reference(
        x.double().view(batch, T, 37), weight.double(), bias.double(), state.double(), activation
    )
    y = native.causal_conv_(x, state, weight, bias, activation)
    assert_close(y, y_expected.reshape(batch * T, 37).float(), name="y")
    assert_close(state, state_expected.float(), name="state")


@requires_kernels
@pytest.mark.parametrize("time_step_limit", [(0.0, float("inf")), (0.05, 0.5)])
@pytest.mark.parametrize(("batch", "H", "P", "G", "N"), [(2, 4, 6, 2, 5), (1, 16, 64, 1, 128), (3, 8, 12, 2, 7)])
def test_mamba2_scan_of_one_token_matches_ssd_step(time_step_limit, batch, H, P, G, N):
    g = torch.Generator().manual_seed(3)
    xBC = torch.randn(batch, H * P + 2 * G * N + 3, generator=g)[:, 3:]  # strided rows
    dt_raw = torch.randn(batch, H + 2, generator=g)[:, 1:-1]
    dt_bias, A_log, D = (torch.randn(H, generator=g) for _ in range(3))
    state = torch.randn(batch, H, P, N, generator=g)
    xs, Bs, Cs = xBC.split([H * P, G * N, G * N], dim=-1)
    dt = F.softplus(dt_raw + dt_bias).clamp(*time_step_limit)
    y_expected, state_expected = ssd_step(
        xs.reshape(batch, H, P), dt, -torch.exp(A_log), Bs.reshape(batch, G, N), Cs.reshape(batch, G, N), D, state
    )
    y = native.mamba2_scan_(xBC, dt_raw, dt_bias, A_log, D, time_step_limit, state)
    assert_close(y, y_expected.reshape(batch, H * P), name="y")
    assert_close(state, state_expected, name="state")


@requires_kernels
@pytest.mark.parametrize(
    ("batch", "T", "H", "P", "G", "N"), [(1, 300, 16, 64, 2, 128), (3, 17, 8, 12, 2, 7), (2, 19, 4, 8, 1, 32)]
)
def test_mamba2_scan_matches_the_reference_loop(batch, T, H, P, G, N):
    """Prefill token by token (strided projection rows, a carried state) against ssd_reference in float64;
    N = 7 takes the one-token-a-pass path, T = 17 and 19 end on partial groups of tokens."""
    g = torch.Generator().manual_seed(T)
    width = H * P + 2 * G * N
    xBC = torch.randn(batch * T, width + 3, generator=g)[:, 3:]  # strided rows
    dt_raw = torch.randn(batch * T, H + 2, generator=g)[:, 1:-1]
    dt_bias, A_log, D = (torch.randn(H, generator=g) for _ in range(3))
    state = torch.randn(batch, H, P, N, generator=g)
    xs, Bs, Cs = xBC.double().view(batch, T, width).split([H * P, G * N, G * N], dim=-1)
    dt = F.softplus(dt_raw.double() + dt_bias.double()).view(batch, T, H)
    y_expected, state_expected = ssd_reference(
        xs.reshape(batch, T, H, P), dt, -torch.exp(A_log.double()), Bs.reshape(batch, T, G, N),
        Cs.reshape(batch, T, G, N), D.double(), state.double(),
    )  # fmt: skip
    y = native.mamba2_scan_(xBC, dt_raw, dt_bias, A_log, D, (0.0, float("inf")), state)
    assert_close(y, y_expected.reshape(batch * T, H * P).float(), name="y")
    assert_close(state, state_expected.float(), name="state")


def test_a_failing_compiler_warns_once_and_everything_runs_on_torch(tmp_path, monkeypatch):
    """A compiler that fails (here `false`) is a RuntimeWarning naming it; the twins then run."""
    monkeypatch.setenv("HYBRIDLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    monkeypatch.delenv("HYBRIDLM_NATIVE", raising=False)
    native._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built with .*false"):
            assert not native.available()
        x, weight = torch.randn(2, 5), torch.randn(3, 5)
        assert_close(native.linear(x, weight), F.linear(x, weight))
        assert not any(tmp_path.rglob("*.so")), "a failed build must leave no library behind"
    finally:
        native._library.cache_clear()


SUBNORMAL = 1e-39  # below fp32's smallest normal (1.18e-38), above its smallest subnormal (1.4e-45)


def _subnormals_survive() -> tuple[bool, bool]:
    """Whether a subnormal survives x * 1 on this thread (a one-element op) and on every thread of the
    pool (an op over 4M elements, which torch splits over its threads)."""
    one = torch.tensor([SUBNORMAL]) * 1.0
    many = torch.full((1 << 22,), SUBNORMAL) * 1.0
    return bool(one[0] != 0), bool((many != 0).all())


@requires_kernels
def test_subnormals_are_flushed_inside_the_block_on_every_thread_and_kept_after():
    assert _subnormals_survive() == (True, True)  # IEEE arithmetic: gradual underflow
    with native.subnormals_flushed():
        assert _subnormals_survive() == (False, False)
        with native.subnormals_flushed():  # nested: still flushing, and the outer block restores
            assert _subnormals_survive() == (False, False)
        assert _subnormals_survive() == (False, False)
    assert _subnormals_survive() == (True, True)


def test_without_the_kernels_the_mode_is_left_alone(monkeypatch):
    monkeypatch.setattr(native, "_library", lambda: None)
    with native.subnormals_flushed():
        assert _subnormals_survive() == (True, True)


@requires_kernels
def test_a_model_forward_flushes_subnormals_and_restores_the_mode():
    from hybridlm.model import HybridLM
    from hybridlm.presets import get_preset

    model = HybridLM(get_preset("debug-tiny", pattern="G*")).eval()
    seen = []
    model.layers[0].register_forward_hook(lambda *_: seen.append(_subnormals_survive()))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert seen == [(False, False)]
    assert _subnormals_survive() == (True, True)


# -- the kernels' worker pool -------------------------------------------------------------------------


def _wide_linear_inputs(seed: int, value: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [3, 512] and W [4096, 512]: work enough (2M weights) for every thread of the pool to take rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 512, generator=g) if value is None else torch.full((3, 512), value)
    return x, torch.randn(4096, 512, generator=g)


@requires_kernels
def test_workers_run_in_the_callers_subnormal_mode():
    """Every share of a kernel (the caller's rows and the workers') follows the calling thread's mode: a
    subnormal input is zero inside subnormals_flushed() and kept outside, on all 4096 output columns."""
    x, weight = _wide_linear_inputs(0, SUBNORMAL)
    weight = weight.abs() + 1.0  # no cancellation: every output is a sum of 512 positive subnormal terms
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        assert (native.linear(x, weight) != 0).all()
        with native.subnormals_flushed():
            assert (native.linear(x, weight) == 0).all()
        assert (native.linear(x, weight) != 0).all()
    finally:
        torch.set_num_threads(threads)


@requires_kernels
def test_kernels_called_from_several_threads_at_once_give_each_caller_its_own_result():
    """While one caller holds the pool, another runs its kernel alone on its own thread: no mixing."""
    import threading

    inputs = [_wide_linear_inputs(seed) for seed in range(4)]
    expected = [F.linear(x, w) for x, w in inputs]
    failures = []

    def call_many(i: int) -> None:
        x, w = inputs[i]
        for _ in range(30):
            if not torch.equal(native.linear(x, w), native.linear(x, w)) or not torch.allclose(
                native.linear(x, w), expected[i], rtol=1e-4, atol=1e-4
            ):
                failures.append(i)
                return

    callers = [threading.Thread(target=call_many, args=(i,)) for i in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert failures == []


@requires_kernels
def test_a_forked_child_gets_a_working_pool():
    """The workers do not survive fork(); the child's first kernel call starts its own."""
    import multiprocessing

    x, weight = _wide_linear_inputs(5)
    native.linear(x, weight)  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as children:
        result = children.apply(native.linear, (x, weight))
    assert_close(result, F.linear(x, weight))


@requires_kernels
@pytest.mark.parametrize(("rows", "width"), [(1, 1), (7, 33), (300, 640)])
def test_swiglu_on_two_halves_of_a_projection_matches_silu_times_up(rows, width):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 2 * width, generator=g) * 4
    gate, up = h.chunk(2, dim=-1)  # strided halves, as the MLP hands them over
    expected = (gate.double() * torch.sigmoid(gate.double())) * up.double()
    assert_close(native.swiglu(gate, up), expected.float())


@requires_kernels
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 1), (5, 2), (300, 8)])
def test_combine_matches_a_float64_weighted_sum_of_gathered_rows(tokens, top_k):
    g = torch.Generator().manual_seed(tokens * top_k)
    y = torch.randn(tokens * top_k + 3, 48, generator=g)
    rows = torch.randperm(tokens * top_k, generator=g).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=g)
    expected = (y.double()[rows] * weights.double()[..., None]).sum(1)
    assert_close(native.combine(y, rows, weights), expected.float())


def test_a_spin_setting_that_is_not_a_number_is_refused_with_a_warning(monkeypatch):
    """The C side would read "fast" as 0 without a word; the loader says so and drops it."""
    monkeypatch.setenv("HYBRIDLM_SPIN_US", "fast")
    with pytest.warns(RuntimeWarning, match="HYBRIDLM_SPIN_US='fast' is not a whole number"):
        native._check_spin_setting()
    assert "HYBRIDLM_SPIN_US" not in os.environ
    monkeypatch.setenv("HYBRIDLM_SPIN_US", "250")
    native._check_spin_setting()  # a number passes untouched
    assert os.environ["HYBRIDLM_SPIN_US"] == "250"


WAKE_STRESS = """
import torch
from hybridlm.ops import native
torch.set_num_threads(2)
x, weight, gate = torch.randn(4, 512), torch.randn(1024, 512), torch.randn(256, 512)
for _ in range(30000):
    native.linear(x, weight)  # fixed shares: the caller waits for the worker
    native.swiglu(gate, gate)  # claimed chunks: the caller may leave without it
print("done")
"""


@requires_kernels
def test_no_wakeup_is_lost_while_a_worker_goes_to_sleep():
    """Workers that spin 10 us and then sleep are going to sleep right as the next kernel is published,
    60,000 times. With the generation published by a release store (x86 may then read `sleepers` before
    the store is visible) this hung within 30,000 iterations in 3 runs of 3."""
    import subprocess
    import sys

    env = {**os.environ, "HYBRIDLM_SPIN_US": "10"}
    result = subprocess.run(
        [sys.executable, "-c", WAKE_STRESS], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
