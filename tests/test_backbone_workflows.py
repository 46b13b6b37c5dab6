"""The backbone explorations and the ViT in every workflow the T2T-ViTs have: official files in
(by name, by the file's args.model and by shapes alone), convert out and back, a short training
run with checkpoints, evaluate and predict on it, and --init-from official weights.

The official-format files are made from the PyTorch oracle (t2t_ref/torch_port.py) as in
test_pretrained.py. vit_7_patch16 stands in for vit_small_patch16_224 where training runs: the
same code at T2T-ViT-7's width (the 768-wide model's 48M parameters and their AdamW moments
would be most of this file's time).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import t2t_ref
from conftest import assert_close
from t2t_ref import convert, evaluate, predict, train
from t2t_ref.checkpoint import load_checkpoint
from t2t_ref.pretrained import matching_variants, read_weights
from test_pretrained import SIZE, TINY, official_pair, oracle_logits, random_images, write_images

NAMES = ["t2t_vit_14_se", "t2t_vit_16_ghost", "t2t_vit_dense", "vit_7_patch16"]


@pytest.mark.parametrize("name", NAMES)
def test_official_files_convert_train_evaluate_predict_and_init_from(name, tmp_path, capsys):
    # in: the EMA weights of an official file, by its args.model; a bare state dict by shapes
    path, _, ema = official_pair(tmp_path, name, dtype=torch.float32)
    x = random_images()
    model = t2t_ref.load_pretrained(path, dtype="float64")
    assert (model.name, model.img_size, model.num_classes) == (name, SIZE, 10)
    assert_close(model.eval().forward(x), oracle_logits(name, ema, x), 1e-9, "logits")
    bare, _, _ = official_pair(tmp_path, name, layout="bare", dtype=torch.float32)
    assert matching_variants(read_weights(bare).weights) == [name]
    assert t2t_ref.load_pretrained(bare).name == name

    # convert: official -> t2t_ref safetensors -> .pth, bit for bit
    ours, back = tmp_path / "w.safetensors", tmp_path / "back.pth"
    assert convert.main([str(path), str(ours)]) == 0
    assert convert.main([str(ours), str(back)]) == 0
    state = torch.load(back, weights_only=True)
    assert set(state) == set(ema) == set(load_file(ours))
    assert all(torch.equal(state[k], v) for k, v in ema.items())

    # a short training run, then evaluate and predict on its checkpoint
    out = tmp_path / "run"
    assert train.main(TINY + ["--model", name, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "best.safetensors"), "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == name and result["images"] == 40
    images = write_images(tmp_path / "img")[:1]
    assert predict.main([*images, "--checkpoint", str(out / "best.safetensors")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 5

    # --init-from the official file: its EMA weights, stopped before the first step
    start = tmp_path / "start"
    code = train.main(TINY + ["--model", name, "--init-from", str(path), "--stop-after", "0",
                              "--out", str(start)])
    assert code == 130
    weights, meta, _, _ = load_checkpoint(start / "last.safetensors")
    assert meta["model"] == name
    for key, value in weights.items():
        assert np.array_equal(value, ema[key].numpy()), key
