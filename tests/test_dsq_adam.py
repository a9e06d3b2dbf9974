"""``dsq_adam``: quantized Adam moments -- codes, error bounds, a step against fairseq's Adam,
memory, checkpoints, and a real ``fairseq-train`` run (MX format) resumed bit-exactly."""

import io
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL_ARGS, fairseq_cmd, run
from fairseq.optim.adam import Adam

from dsq_fairseq.optim.dsq_adam import QuantizedStateAdam
from dsq_fairseq.optim.state_quant import StateQuantizer, tensor_bytes
from dsq_fairseq.precision import DSQConfigError

USER_DIR = str(REPO / "dsq_fairseq")
QUANTIZED = [("int", 8, 128), ("int", 4, 32), ("bfp", 8, 64), ("bfp", 3, 16), ("fixed", 8, 1)]


# ------------------------------------------------------------------ state codes


@pytest.mark.parametrize("fmt, bits, block", QUANTIZED)
@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_integers_within_the_error_bound(fmt, bits, block, signed):
    q = StateQuantizer(fmt, bits, block)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.logspace(-4, 1, 1000)
    x = x if signed else x.abs()
    x[:block] = 0.0  # an all-zero block stays zero
    enc = q.encode(x, signed)
    codes = enc["codes"]
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.numel() == 1000
    kmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    assert int(codes.int().abs().max()) <= kmax
    blk = q.block_for(1000)
    side = enc["scale"] if fmt == "int" else enc["exp"]
    assert side.numel() == -(-1000 // blk)
    assert side.dtype == (torch.float32 if fmt == "int" else torch.int8)
    y = StateQuantizer.decode(codes, bits, blk, signed, enc.get("scale"), enc.get("exp"))
    err = (y - x).abs()
    assert bool((err <= q.error_bound(x, signed)).all())
    assert bool((y[:block] == 0).all())
    if not signed:  # a positive sqrt(v) never decodes to 0
        assert bool((y[x > 0] > 0).all())


def test_int8_codes_exactly():
    q = StateQuantizer("int", 8, 4)
    enc = q.encode(torch.tensor([1.0, -0.5, 0.25, 0.0, 3.0, 0.0, 0.0, 0.0]), signed=True)
    assert enc["codes"].tolist() == [127, -64, 32, 0, 127, 0, 0, 0]  # -63.5 -> -64 (even)
    assert enc["scale"].tolist() == pytest.approx([1 / 127, 3 / 127])
    enc = StateQuantizer("bfp", 8, 4).encode(torch.tensor([1.0, 0.5, 0.001, 1.5]), signed=False)
    # E = floor(log2 1.5) = 0, unsigned step 2^(0-7): 1.5 -> 192, 0.001 -> 0.128 -> raised to 1
    assert enc["exp"].tolist() == [0] and enc["codes"].tolist() == [128, 64, 1, 192]


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"format": "int4"}, "--dsq-adam-state-format"), ({"bits": 9}, "--dsq-adam-state-bits"),
     ({"bits": 1}, "--dsq-adam-state-bits"), ({"block_size": 0}, "--dsq-adam-block-size")],
)
def test_bad_options_name_the_flag(kwargs, flag):
    with pytest.raises(DSQConfigError, match=flag):
        StateQuantizer(**kwargs)


# ------------------------------------------------------------------ the optimizer step


def _trajectory(factory, steps, shape=(64, 40)):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    b = torch.nn.Parameter(torch.randn(shape[0]))
    opt = factory([w, b])
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        w.grad = torch.randn(w.shape, generator=g) * (1 + i % 3)
        b.grad = torch.randn(b.shape, generator=g)
        opt.step()
    return [w.detach().clone(), b.detach().clone()], opt


HP = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)


def test_format_none_is_fairseqs_adam_bit_for_bit():
    # The first trajectory of a pytest process was seen to differ from every later one in the
    # last bit of ~half the elements (2.98e-06) even for fairseq's Adam against itself (torch CPU
    # kernels, not the optimizer): run one unmeasured trajectory first so both compared runs see
    # the same process state.
    _trajectory(lambda p: Adam(p, **HP), 6)
    ref, _ = _trajectory(lambda p: Adam(p, **HP), 6)
    got, opt = _trajectory(
        lambda p: QuantizedStateAdam(p, quantizer=StateQuantizer("none"), **HP), 6
    )
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert opt.state_bytes() == 8 * sum(t.numel() for t in got)


@pytest.mark.parametrize("fmt, bits, block", QUANTIZED)
def test_a_step_is_adam_from_the_dequantized_state(fmt, bits, block):
    """From the state it holds, one step is exactly fairseq's Adam step, and the new stored
    moments are the exact new moments within the quantization error bound."""
    q = StateQuantizer(fmt, bits, block)
    _, opt = _trajectory(lambda p: QuantizedStateAdam(p, quantizer=q, **HP), 3)
    for p in [p for g in opt.param_groups for p in g["params"]]:
        state = opt.state[p]
        m, v = opt._load_moments(state, p.detach())
        # reference: fairseq's Adam, handed the dequantized moments
        ref_p = torch.nn.Parameter(p.detach().clone())
        ref = Adam([ref_p], **HP)
        ref.state[ref_p] = {"step": state["step"], "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
        grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(5))
        ref_p.grad, p.grad = grad.clone(), grad.clone()
        ref.step()
        for other in opt.param_groups[0]["params"]:
            if other is not p:
                other.grad = None
        opt.step()
        assert torch.equal(p.detach(), ref_p.detach())  # the update itself is exact Adam
        new_m, new_v = opt._load_moments(opt.state[p], p.detach())
        exact_m, exact_v = ref.state[ref_p]["exp_avg"], ref.state[ref_p]["exp_avg_sq"]
        assert bool(((new_m - exact_m).abs().flatten() <= q.error_bound(exact_m, True)).all())
        u = exact_v.sqrt()
        assert bool(((new_v.sqrt() - u).abs().flatten() <= q.error_bound(u, False)).all())


def test_8bit_trajectory_stays_close_and_state_shrinks():
    ref, adam = _trajectory(lambda p: Adam(p, **HP), 20)
    got, opt = _trajectory(
        lambda p: QuantizedStateAdam(p, quantizer=StateQuantizer("int", 8, 128), **HP), 20
    )
    for a, b in zip(ref, got):
        assert (a - b).norm() / a.norm() < 0.01
    numel = sum(t.numel() for t in got)
    adam_bytes = tensor_bytes({id(p): s for p, s in adam.state.items()})
    assert adam_bytes == 8 * numel
    # two 1-byte codes per element + one fp32 scale per 128 elements (a tail is its own block)
    assert opt.state_bytes() == 2 * numel + 2 * 4 * (-(-2560 // 128) + -(-64 // 128))
    assert opt.state_bytes() < 0.27 * adam_bytes


def test_state_dict_round_trips_exactly_with_integer_codes():
    q = StateQuantizer("bfp", 8, 64)
    _, opt = _trajectory(lambda p: QuantizedStateAdam(p, quantizer=q, **HP), 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    params = [torch.nn.Parameter(p.detach().clone()) for g in opt.param_groups for p in g["params"]]
    opt2 = QuantizedStateAdam(params, quantizer=q, **HP)
    opt2.load_state_dict(loaded)
    for p, p2 in zip([p for g in opt.param_groups for p in g["params"]], params):
        s, s2 = opt.state[p], opt2.state[p2]
        assert s.keys() == s2.keys()
        for k in s:
            if isinstance(s[k], torch.Tensor):
                assert s[k].dtype == s2[k].dtype and torch.equal(s[k], s2[k])
            else:
                assert s[k] == s2[k]
    # continuing from the loaded state == continuing from the original
    for p, p2 in zip([p for g in opt.param_groups for p in g["params"]], params):
        p.grad = torch.ones_like(p)
        p2.grad = torch.ones_like(p2)
    opt.step()
    opt2.step()
    assert all(
        torch.equal(a.detach(), b.detach())
        for a, b in zip([p for g in opt.param_groups for p in g["params"]], params)
    )
    # a changed layout is converted on the next step (decode old, encode new)
    opt3 = QuantizedStateAdam(params, quantizer=StateQuantizer("int", 4, 32), **HP)
    opt3.load_state_dict(opt2.state_dict())
    opt3.step()
    assert opt3.state[params[0]]["qbits"] == 4 and "exp_avg_scale" in opt3.state[params[0]]


# ------------------------------------------------------------------ fairseq-train


def train_cmd(data_bin: Path, save_dir: Path, max_update: int, optimizer: str = "dsq_adam"):
    opt = ["--optimizer", optimizer]
    if optimizer == "dsq_adam":
        opt += ["--dsq-adam-state-format", "int", "--dsq-adam-state-bits", "8",
                "--dsq-adam-block-size", "128"]
    return [
        fairseq_cmd("fairseq-train"), str(data_bin), "--user-dir", USER_DIR,
        "--task", "dsq_translation", "--arch", "dsq_transformer_iwslt_de_en", *TINY_MODEL_ARGS,
        "--dsq-format", "mx",
        "--dsq-schedule", "mxfp4,mxfp4,mxfp4,mxfp8_e5m2;mxfp8_e4m3,mxfp4,mxfp4,mxfp8_e5m2",
        "--dsq-patience", "1", "--dsq-min-delta", "100",
        *opt, "--adam-betas", "(0.9,0.98)", "--lr", "1e-3",
        "--criterion", "label_smoothed_cross_entropy",
        "--max-tokens", "500", "--max-update", str(max_update), "--seed", "1", "--cpu",
        "--validate-interval-updates", "2", "--save-interval-updates", "2",
        "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1",
        "--save-dir", str(save_dir),
    ]


def losses_by_update(log: str):
    return {
        int(m.group(2)): m.group(1)
        for m in re.finditer(r"train_inner \|.*? loss=([\d.]+),.*?num_updates=(\d+)", log)
    }


@pytest.fixture(scope="module")
def runs(data_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dsq_adam")
    full = run(train_cmd(data_bin, tmp / "full", 8), cwd=tmp)
    first = run(train_cmd(data_bin, tmp / "resumed", 4), cwd=tmp)
    second = run(train_cmd(data_bin, tmp / "resumed", 8), cwd=tmp)
    adam = run(train_cmd(data_bin, tmp / "adam", 4, optimizer="adam"), cwd=tmp)
    logs = {k: p.stdout + p.stderr for k, p in
            dict(full=full, first=first, second=second, adam=adam).items()}
    return tmp, logs


def test_mx_and_dsq_adam_train_and_resume_exactly(runs):
    _, logs = runs
    full = losses_by_update(logs["full"])
    assert sorted(full) == list(range(1, 9))
    assert "[mxfp4,mxfp4,mxfp4,mxfp8_e5m2] -> [mxfp8_e4m3,mxfp4,mxfp4,mxfp8_e5m2]" in logs["full"]
    assert re.search(r"dsq_bits=4, dsq_q0=8, dsq_q1=4, dsq_q2=4, dsq_q3=8", logs["full"])
    assert "dsq_adam: moments stored as int8 (blocks of 128)" in logs["full"]
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)",
                     logs["second"])
    resumed = {**losses_by_update(logs["first"]), **losses_by_update(logs["second"])}
    assert resumed == full  # identical losses at every update, 1..8


def test_checkpoints_hold_quantized_states_and_load_weights_only(runs):
    tmp, _ = runs
    from dsq_fairseq.optim.__main__ import checkpoint_state_bytes

    ckpt = torch.load(tmp / "resumed" / "checkpoint_1_4.pt", weights_only=True)
    states = ckpt["last_optimizer_state"]["state"]
    assert ckpt["optimizer_history"][-1]["optimizer_name"] == "FairseqDSQAdam"
    one = next(iter(states.values()))
    assert one["exp_avg_codes"].dtype == torch.int8 and one["exp_avg_sq_codes"].dtype == torch.uint8
    ours = checkpoint_state_bytes(str(tmp / "resumed" / "checkpoint_1_4.pt"))
    adam = checkpoint_state_bytes(str(tmp / "adam" / "checkpoint_1_4.pt"))
    assert adam["optimizer"] == "FairseqAdam" and adam["state_bytes"] == adam["fp32_adam_bytes"]
    assert ours["num_params"] == adam["num_params"] > 0
    assert ours["state_bytes"] < 0.27 * adam["state_bytes"]
