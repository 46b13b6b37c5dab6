"""t2t_ref.summary: parameters against the official counts, MACs against a count of every
matrix product of a real forward pass, the official figures beside ours, and the CLI."""

import math

import array_api_compat.numpy as xp_numpy
import numpy as np
import pytest

import t2t_ref
from t2t_ref.summary import OFFICIAL_GMACS, count, main, summary, summary_rows
from test_model import COUNTS


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts_are_the_official_ones(name):
    total, trainable, _ = count(name)
    assert (total, trainable) == COUNTS[name][:2]


def measured_macs(model, x):
    """MACs per image of model.forward(x), counting n*k*m for every xp.matmul of the forward
    but the row and column sums of ops/rows.py (2-D products with one row or one column out;
    the model's own products have B >= 2 rows and more than one column here)."""
    original, macs = xp_numpy.matmul, []

    def counting_matmul(a, b, **kwargs):
        out = original(a, b, **kwargs)
        if not (out.ndim == 2 and 1 in out.shape):
            macs.append(math.prod(out.shape) * a.shape[-1])
        return out

    xp_numpy.matmul = counting_matmul
    try:
        model.forward(x, keep_cache=False)
    finally:
        xp_numpy.matmul = original
    return sum(macs) // x.shape[0]


@pytest.mark.parametrize("name, size", [
    ("t2t_vit_7", 48), ("t2t_vit_t_14", 32), ("t2t_vit_14_se", 32), ("t2t_vit_16_ghost", 32),
    ("t2t_vit_dense", 32), ("vit_7_patch16", 48)])
def test_mac_formulas_equal_a_count_of_the_real_forward(name, size):
    """Every kind of layer: performer and transformer T2T layers, plain, SE, ghost and dense
    blocks, transitions, the patch embedding, the head."""
    model = t2t_ref.create_model(name, num_classes=10, img_size=size)
    x = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    assert count(name, size, 10)[2] == measured_macs(model, x)


@pytest.mark.parametrize("name", list(OFFICIAL_GMACS))
def test_official_figures_are_within_their_rounding_and_counter(name):
    """A quarter G at most apart (the official counter is another one, its figures rounded);
    the farthest is t2t_vit_dense, 5.28 G here against Table 6's 5.5."""
    ours = count(name)[2] / 1e9
    official, source, _ = OFFICIAL_GMACS[name]
    assert abs(ours - official) <= 0.25, f"{name}: ours {ours:.2f} G, {source} {official} G"


def test_rows_follow_the_model_stage_by_stage():
    rows = summary_rows("t2t_vit_dense", 224)
    by_stage = {r.stage: r for r in rows}
    assert by_stage["tokens_to_token.attention1"].shape == (1, 3136, 64)
    assert by_stage["tokens_to_token.attention1"].params - \
        by_stage["tokens_to_token.attention1"].trainable == 32 * 64  # the fixed w
    assert [by_stage[f"blocks.{i}"].what for i in (2, 3, 4)] == \
        ["dense block", "transition", "dense block"]
    assert by_stage["blocks.3"].shape == (1, 197, 160) and by_stage["blocks.21"].shape[-1] == 584
    assert by_stage["head"].shape == (1, 1000) and by_stage["head"].macs == 584 * 1000
    model = t2t_ref.create_model("vit_7_patch16", num_classes=10, img_size=32)
    state = model.state_dict()
    rows = summary_rows("vit_7_patch16", 32, 10)
    assert sum(r.params for r in rows) == sum(v.size for v in state.values())
    assert {r.stage: r.params for r in rows}["patch_embed"] == 256 * 768 + 256


def test_summary_table_and_cli(capsys):
    assert t2t_ref.summary is summary and t2t_ref.count is count  # the package's functions
    text = summary("t2t_vit_14_se")
    assert "blocks.13" in text and "block (se)" in text and "21,803,598" in text
    assert "official: 4.9 GMACs (paper Table 6)" in text
    assert main(["t2t_vit_16_ghost", "--img-size", "64", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "t2t_vit_16_ghost at 64x64, 10 classes" in out and "official" not in out
    assert main(["--all"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in t2t_ref.list_models()) and "issue #47" in out
    for argv, needle in ((["t2t_vit_7", "--img-size", "50"], "not a multiple of 16"),
                         (["t2t_vit_7", "--img-size", "8"], "out of range"),
                         (["t2t_vit_8"], "invalid choice: 't2t_vit_8'"),
                         ([], "name a model")):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own errors, made one line by cli.Parser
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, (argv, err)


def test_the_summary_command_runs_without_warnings():
    """`python -m t2t_ref.summary` is a module the package itself imports: Python's warning that
    it runs twice must not greet every use of the command."""
    import subprocess
    import sys
    job = subprocess.run([sys.executable, "-W", "default", "-m", "t2t_ref.summary", "t2t_vit_7",
                          "--img-size", "32"], capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert job.stderr == "", job.stderr
    assert job.stdout.startswith("t2t_vit_7 at 32x32")
